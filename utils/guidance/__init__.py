"""h-space guidance: settings and presets (``settings``), targets and the resolved plan
(``targets``), the estimators and losses (``estimators``), the guide the batch loop calls
(``guide``). ``build_guide`` ties them together from a config, as every entry point does."""
from __future__ import annotations

from utils.config import RunConfig
from utils.guidance.guide import Guide
from utils.guidance.settings import GuidanceSettings, resolve_settings
from utils.guidance.targets import GuidancePlan, plan_guidance


def build_plan(cfg: dict, mode: str, raw: dict[str, str], attributes: dict[str, list[str]],
               overrides: dict | None = None, scale_spec: str | None = None,
               priors: dict[str, list[float]] | None = None) -> GuidancePlan:
    """Settings from ``cfg['guidance']`` + overrides, resolved for raw targets {key: value};
    ``priors``: the ADP's class fractions (``ADP.class_prior``)."""
    rc = RunConfig.of(cfg, require_model=False)
    settings: GuidanceSettings = resolve_settings(rc.guidance, overrides, rc.family)
    return plan_guidance(settings, mode, raw, attributes, rc.refine, scale_spec, priors)


def build_guide(cfg: dict, plan: GuidancePlan, adp, betas, distributed: bool = False,
                labeller=None) -> Guide:
    """The run's Guide; the check's labeller is the config's ``labeller`` (loaded here unless
    given)."""
    if labeller is None and plan.needs_labeller():
        rc = RunConfig.of(cfg, require_model=False)
        if not rc.labeller:
            raise ValueError(f"the guidance settings ask for a finished-image check but config "
                             f"{rc.name} names no labeller: set 'labeller:' or pass --no-check")
        from models.labellers import load_labeller
        labeller = load_labeller(rc.labeller)
    return Guide(plan, adp, betas, labeller if plan.needs_labeller() else None, distributed)
