"""Small builders shared by the guidance tests: a hand-made ADP and guides on it."""
import torch

from models.adp import ADP
from models.hspace import Step
from utils.guidance.guide import Guide
from utils.guidance.settings import resolve_settings
from utils.guidance.targets import GuidancePlan

BETAS = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)


def hand_adp(attrs=("a",)):
    """h_shape (2,1,1), timesteps [10, 0]; attribute 'a': logit_1 - logit_0 = 2 h_0 and (if
    asked) attribute 'b': logit_1 - logit_0 = 2 h_1. mean 0, std 1, identity covariance:
    directions = weights."""
    adp = ADP((2, 1, 1), [10, 0], {a: ["c0", "c1"] for a in attrs})
    with torch.no_grad():
        for k, a in enumerate(attrs):
            w = torch.zeros(2, 2)
            w[0, k], w[1, k] = -1.0, 1.0
            for s in range(2):
                adp.weight[a][s] = w
                getattr(adp, f"dir_{a}")[s] = w
    return adp.eval()


def settings(**over):
    """The 'ours' preset made plain for hand computations: soft estimate, no debias, no
    running balance / check / refine, temperature 1, every step guided, a loose cap."""
    base = dict(preset="ours", estimator="soft", debias=False, running_balance=False, check=False,
                refine=False, temperature=1.0, first_step=0, max_step=100.0, sample_max_step=100.0,
                soft_max_step=None, soft_distribution_scale=None)
    base.update(over)
    return resolve_settings(base)


def plan(targets, mode="distribution", scale=1.0, classes=None, **over):
    """A GuidancePlan on ``targets`` {key: tensor} with one scale for every key."""
    s = settings(**over)
    est = "sample" if mode == "sample" else ("quota" if s.estimator == "quota" else "soft")
    return GuidancePlan(mode, s, targets, {k: v.tolist() for k, v in targets.items()},
                        {k: scale for k in targets}, est, s.cap(est == "soft", mode), classes)


def guide(adp, targets, mode="distribution", scale=1.0, classes=None, labeller=None,
          distributed=False, **over):
    """A run's Guide on a hand-built plan."""
    return Guide(plan(targets, mode, scale, classes, **over), adp, BETAS, labeller, distributed)


def step_once(adp, targets, h, i=0, t=10, n=None, **kw):
    """(edited h, the batch guide) for one step of a fresh batch guide."""
    b = guide(adp, targets, **kw).start(list(range(n or len(h))))
    return b.edit(h, Step(i, t)), b


def save_tiny_clip(folder):
    """A tiny random CLIPModel with models.sd_tiny's character tokenizer, saved to ``folder``
    (a zero-shot labeller for the tiny text-to-image pipelines)."""
    import json
    from transformers import CLIPConfig, CLIPModel
    from models.sd_tiny import write_char_tokenizer
    write_char_tokenizer(folder)
    vocab = len(json.loads((folder / "vocab.json").read_text()))
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=16, patch_size=4),
        projection_dim=16))
    model.save_pretrained(folder)
    return folder
