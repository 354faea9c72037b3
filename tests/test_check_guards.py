"""scripts/check_guards.sh: every guard's pattern is in its file (the script breaks its first
occurrence; a stale pattern would break nothing and leave its guard untested)."""
import shlex

from models.files import resolve_path


def guards() -> list[tuple[str, str, str, str]]:
    text = resolve_path("scripts/check_guards.sh").read_text()
    return [tuple(shlex.split(line)[1:]) for line in text.splitlines() if line.startswith('run "')]


def test_every_guard_pattern_is_in_its_file():
    found = guards()
    assert len(found) >= 14
    for name, path, pattern, broken in found:
        assert pattern in resolve_path(path).read_text(), (name, path, pattern)
        assert broken != pattern, name
