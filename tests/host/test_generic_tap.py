"""The generic tap for families the pack's table does not know: each tiny transformer family hidden from the table
in turn must be read as the table reads it (the same block, the same image tokens, bit-identical training losses),
found by one probe forward; what the probe cannot read (Z-Image's padded tokens) is refused by name."""
import pytest
import torch

from dev.tiny_families import FAMILIES, latent_shape, tiny_conditioning, tiny_model
from tests.host.models import session

pytestmark = pytest.mark.host
TRANSFORMERS = [f for f in FAMILIES if f not in ("sd15", "sd20_v", "sdxl")]
# where the probe must find the image tokens inside a joint text + image sequence at the table's tap
JOINT = {"flux", "flux_schnell", "chroma", "flux2", "lumina2", "hidream", "hunyuan_image21"}
# Z-Image pads its image tokens to a multiple of 32 before its blocks: no tensor holds exactly the grid's tokens
PADDED = {"z_image"}


def table_key(dm):
    from selfperc_pack.nodes import families

    return next(c.__name__ for c in type(dm).__mro__ if c.__name__ in families.FAMILIES)


def train_three_steps(pack, mp, cond, shape, other=None):
    """(tap name, the frozen features of a fixed input (and with the ``other`` conditioning, e.g. a caption of
    another length, after the first read), the losses of 3 Adam steps on a fixed batch)."""
    from selfperc_pack.nodes import bridge, inputs
    from selfperc_pack.selfperc_core import self_perceptual_loss

    g = torch.Generator().manual_seed(0)
    full = (2, *shape[1:])
    sig = bridge.sigma_of_t_fn(bridge.model_sampling(mp))
    batch = (torch.randn(full, generator=g), torch.randn(full, generator=g), sig(torch.tensor([0.3, 0.7])),
             sig(torch.tensor([0.6, 0.2])))
    with torch.inference_mode(False), session(pack, mp, checkpointing=True, latent_shape=shape[1:], batch=2) as ses:
        c = inputs.collate([inputs.model_inputs(ses.mp, cond, shape[1:])] * 2)
        with torch.no_grad():
            feats = [ses.frozen_features(batch[0], batch[2], c).clone()]
            if other is not None:
                c2 = inputs.collate([inputs.model_inputs(ses.mp, other, shape[1:])] * 2)
                feats.append(ses.frozen_features(batch[0], batch[2], c2).clone())
        opt = torch.optim.Adam(ses.params, lr=3e-3)
        losses = []
        for _ in range(3):
            opt.zero_grad()
            parts = self_perceptual_loss(lambda x, s: ses.predict_x0(x, s, c),
                                         lambda x, s: ses.frozen_features(x, s, c), ses.view.noise_scaling, *batch)
            parts.loss.backward()
            opt.step()
            losses.append(parts.loss.item())
        return ses.tap_name, feats, losses


@pytest.mark.parametrize("family", TRANSFORMERS)
def test_a_family_hidden_from_the_table_is_read_as_the_table_reads_it(pack, comfy, family,
                                                                                         monkeypatch, caplog):
    from selfperc_pack.nodes import families

    mp, cond, shape = tiny_model(family), tiny_conditioning(family), latent_shape(family, None, side=4)
    dm = mp.model.diffusion_model
    other = tiny_conditioning(family, seed=3, tokens=12)  # a caption of another length, read after the probe
    table = train_three_steps(pack, mp, cond, shape, other)
    monkeypatch.delitem(families.FAMILIES, table_key(dm))
    monkeypatch.setattr(families, "_warned", set())
    if family in PADDED:
        with pytest.raises(ValueError, match=f"{type(dm).__name__} is not in the pack's table and the generic tap "
                                             "cannot read it: no block list's output holds the latent's .* image "
                                             "tokens.*; please report the class name"):
            train_three_steps(pack, mp, cond, shape, other)
        return
    with caplog.at_level("WARNING", logger="selfperc"):
        generic = train_three_steps(pack, mp, cond, shape, other)
    assert generic[0] == table[0]  # the same block of the same stack
    assert all(torch.equal(g, t) for g, t in zip(generic[1], table[1]))  # the same image tokens, at either length
    assert generic[2] == table[2], (generic[2], table[2])  # the same training, bit for bit
    assert f"{type(dm).__name__} is not in the pack's table: the generic tap found stack" in caplog.text
    assert ("tokens of a joint sequence" in caplog.text) == (family in JOINT), caplog.text


def test_a_model_without_a_block_list_is_refused_by_name(pack, comfy):
    from selfperc_pack.nodes import families

    class Opaque(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)
            self.mixed = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Conv2d(4, 4, 1)])

    with pytest.raises(ValueError, match="Opaque is not supported yet: it is not in the pack's table .* no list of "
                                         "blocks of one class .* please report the class name"):
        families.tap_point(Opaque())
