"""The generic tap's probe (selfperc_core/block_probe.py) on toy dual- and single-stream transformers."""
import pytest
import torch
from torch import nn

from selfperc_core.block_probe import BlockProbe, Picker, ProbedTap, find_in


class Dual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.a, self.b = nn.Linear(c, c), nn.Linear(c, c)

    def forward(self, img, txt):
        return img + self.a(img), txt + self.b(txt)


class Single(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.a = nn.Linear(c, c)

    def forward(self, x):
        x += self.a(x)  # in place, as Flux's single blocks: the probe must read the input before the block runs
        return x


class Toy(nn.Module):
    """A text projection (the longest list, text only), dual-stream blocks, then single-stream over [txt, img] (or
    [img, txt])."""

    def __init__(self, c=8, image_first=False):
        super().__init__()
        self.proj = nn.ModuleList([nn.Linear(c, c) for _ in range(6)])
        self.dual = nn.ModuleList([Dual(c) for _ in range(2)])
        self.single = nn.ModuleList([Single(c) for _ in range(3)])
        self.image_first = image_first
        self.seen = []

    def forward(self, img, txt):
        for p in self.proj:
            txt = p(txt)
        for b in self.dual:
            img, txt = b(img, txt)
        x = torch.cat((img, txt) if self.image_first else (txt, img), 1)
        for b in self.single:
            x = b(x)
            n = img.shape[1]
            self.seen.append((x[:, :n] if self.image_first else x[:, -n:]).clone())
        return x


@pytest.mark.parametrize("image_first", [False, True])
def test_the_probe_finds_the_dual_then_single_stack_and_the_image_tokens_in_the_joint_sequence(image_first):
    torch.manual_seed(0)
    toy = Toy(image_first=image_first)
    img, txt = torch.randn(2, 5, 8), torch.randn(2, 7, 8)
    lists = {"proj": toy.proj, "dual": toy.dual, "single": toy.single}
    probe = BlockProbe(lists, n=5)
    probe.run(lambda: toy(img, txt))
    stack, picks = probe.stack("Toy")
    assert stack == [("dual", 0), ("dual", 1), ("single", 0), ("single", 1), ("single", 2)]
    assert picks == {"dual": Picker(0), "single": Picker(None, "first" if image_first else "last")}

    toy.seen.clear()
    tap = ProbedTap(lists, 0.7, lambda shape: shape[1], lambda t, shape: t, "Toy")
    with torch.no_grad():
        feats = tap.features(lambda x, t: toy(x, t), img, txt)  # the probe, then the read
    assert tap.name == "block 3 of 5" and tap.module is toy.single[1]
    torch.testing.assert_close(feats, toy.seen[1], rtol=0, atol=0)  # the probe saw single[1] give these tokens
    for length in (3, 12):  # another caption length at a later read: the image tokens are read from their side
        other = torch.randn(2, length, 8)
        toy.seen.clear()
        with torch.no_grad():
            toy(img, other)
            expected = toy.seen[1]
            feats = tap.features(lambda x, t: toy(x, t), img, other)
        torch.testing.assert_close(feats, expected, rtol=0, atol=0)


class TextAfter(Toy):
    """A text-only list after the joint stage (longer than every other): it must not become the stack."""

    def __init__(self):
        super().__init__()
        self.post = nn.ModuleList([nn.Linear(8, 8) for _ in range(8)])

    def forward(self, img, txt):
        x = super().forward(img, txt)
        t = x[:, :7]
        for p in self.post:
            t = p(t)
        return t


def test_a_list_that_never_took_the_image_tokens_in_is_not_part_of_the_stack():
    toy = TextAfter()
    img, txt = torch.randn(1, 5, 8), torch.randn(1, 30, 8)  # after the joint stage the text alone is 30 > 5 tokens
    probe = BlockProbe({"dual": toy.dual, "single": toy.single, "post": toy.post}, n=5)
    probe.run(lambda: toy(img, txt[:, :7]))
    stack, picks = probe.stack("TextAfter")
    assert [s for s, _ in stack] == ["dual"] * 2 + ["single"] * 3 and "post" not in picks


def test_a_text_as_long_as_the_image_is_named_in_the_refusal():
    toy = Toy()
    probe = BlockProbe({"dual": toy.dual}, n=5)
    probe.run(lambda: toy(torch.randn(1, 5, 8), torch.randn(1, 5, 8)))
    with pytest.raises(ValueError, match="dual output two tensors of 5 tokens"):
        probe.stack("Toy")


def test_a_model_whose_blocks_never_hold_the_grids_tokens_is_refused_naming_it():
    toy = Toy()
    probe = BlockProbe({"proj": toy.proj}, n=5)
    probe.run(lambda: toy(torch.randn(1, 5, 8), torch.randn(1, 7, 8)))
    with pytest.raises(ValueError, match="Toy: no block list's output holds the latent's 5 image tokens.*; report it"):
        probe.stack("Toy", "report it")


def test_find_in_locates_an_exact_run_of_tokens_only():
    x = torch.randn(1, 9, 4)
    assert find_in(x, x[:, 3:7].clone()) == 3
    assert find_in(x, x[:, 3:7] + 1e-6) is None
    assert find_in(x, x) is None  # not a proper part
