"""model/losses.py: the SAT loss (DESIGN §5), its parts by hand, and the all-reduced area term."""
from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import socket

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.special import logsumexp
from scipy.stats import norm

from model.factory import create_model
from model.losses import (
    SATLossConfig,
    gaussian_kernel_3x3,
    global_mean,
    sat_loss,
    sat_loss_terms,
    smooth_map,
)


def hand_gkern(nsig: float = 6.0) -> np.ndarray:
    """The official code's ``gkern(3, nsig)``, written out in numpy/scipy."""
    interval = (2 * nsig + 1.0) / 3
    x = np.linspace(-nsig - interval / 2.0, nsig + interval / 2.0, 4)
    kern1d = np.diff(norm.cdf(x))
    kernel = np.sqrt(np.outer(kern1d, kern1d))
    return kernel / kernel.sum()


def hand_parts(logits, loc_map, targets, alpha, nsig=6.0):
    logits, loc_map = np.asarray(logits, np.float64), np.asarray(loc_map, np.float64)
    ce = np.mean(logsumexp(logits, axis=1) - logits[np.arange(len(targets)), targets])
    area = abs(loc_map.mean() - alpha)
    kernel = hand_gkern(nsig)
    smoothed = np.stack([ndimage.correlate(m[0], kernel, mode="constant", cval=0.0) for m in loc_map])
    norm_term = np.mean(smoothed * (1 - smoothed))
    return ce, area, norm_term


def test_gaussian_kernel_values():
    kernel = gaussian_kernel_3x3(6.0).numpy()
    np.testing.assert_allclose(kernel, hand_gkern(6.0), rtol=1e-6, atol=1e-8)
    assert kernel[1, 1] == pytest.approx(0.805, abs=5e-4)
    assert kernel[0, 1] == pytest.approx(0.046, abs=5e-4)
    assert kernel[0, 0] == pytest.approx(0.0026, abs=5e-5)
    assert kernel.sum() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(kernel, kernel.T)
    # Another nsig gives another (hand-checked) kernel: nsig is really an option.
    np.testing.assert_allclose(gaussian_kernel_3x3(1.0).numpy(), hand_gkern(1.0), rtol=1e-6, atol=1e-8)


def test_smooth_map_is_zero_padded_correlation():
    m = torch.rand(2, 1, 4, 5, generator=torch.Generator().manual_seed(0))
    expected = np.stack([ndimage.correlate(x[0].double().numpy(), hand_gkern(), mode="constant") for x in m])
    np.testing.assert_allclose(smooth_map(m)[:, 0].numpy(), expected, rtol=1e-5, atol=1e-7)
    # A single 1 spreads exactly the kernel around it.
    impulse = torch.zeros(1, 1, 5, 5)
    impulse[0, 0, 2, 2] = 1
    np.testing.assert_allclose(smooth_map(impulse)[0, 0, 1:4, 1:4].numpy(), hand_gkern(), rtol=1e-5)


def test_loss_parts_equal_hand_values():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(3, 5, generator=g) * 2
    loc_map = torch.rand(3, 1, 3, 4, generator=g)
    targets = torch.tensor([4, 0, 2])
    config = SATLossConfig(alpha=0.35)
    parts = sat_loss(logits, loc_map, targets, config)
    ce, area, norm_term = hand_parts(logits, loc_map, targets.numpy(), alpha=0.35)
    assert parts.ce.item() == pytest.approx(ce, rel=1e-5)
    assert parts.area.item() == pytest.approx(area, rel=1e-5, abs=1e-7)
    assert parts.norm.item() == pytest.approx(norm_term, rel=1e-5)
    assert parts.total.item() == pytest.approx(ce + area + norm_term, rel=1e-5)
    # The parts are reported, not trained through; the total carries the graph.
    assert not parts.ce.requires_grad and not parts.area.requires_grad and not parts.norm.requires_grad


def test_loss_on_a_tiny_map_written_out():
    # A 2 x 2 map: mean 0.5; alpha 0.25 -> area 0.25. Smoothing with zero padding keeps
    # centre 0.805 of each cell plus edge/corner neighbours from the others.
    loc_map = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    k = hand_gkern()
    c, e, d = k[1, 1], k[0, 1], k[0, 0]
    s_on, s_off = c + d, 2 * e  # a '1' cell sees its diagonal partner; a '0' cell its two edge neighbours
    expected_norm = (2 * s_on * (1 - s_on) + 2 * s_off * (1 - s_off)) / 4
    logits = torch.tensor([[0.0, np.log(3.0)]])  # p(class 1) = 3/4
    parts = sat_loss(logits, loc_map, torch.tensor([1]), SATLossConfig(alpha=0.25))
    assert parts.ce.item() == pytest.approx(-np.log(0.75), rel=1e-6)
    assert parts.area.item() == pytest.approx(0.25, abs=1e-7)
    assert parts.norm.item() == pytest.approx(expected_norm, rel=1e-5)


def test_weights_and_spatial_scale_ramp():
    g = torch.Generator().manual_seed(1)
    logits, loc_map = torch.randn(2, 4, generator=g), torch.rand(2, 1, 5, 5, generator=g)
    targets = torch.tensor([1, 3])
    ce, area, norm_term = hand_parts(logits, loc_map, targets.numpy(), alpha=0.25)
    config = SATLossConfig(alpha=0.25, area_weight=2.0, norm_weight=0.5)
    for scale in (0.0, 0.1, 0.5, 1.0):
        parts = sat_loss(logits, loc_map, targets, config, spatial_scale=scale)
        assert parts.total.item() == pytest.approx(ce + scale * (2.0 * area + 0.5 * norm_term), rel=1e-5)
        # The reported parts do not depend on the ramp.
        assert parts.area.item() == pytest.approx(area, rel=1e-5)
        assert parts.norm.item() == pytest.approx(norm_term, rel=1e-5)
    assert sat_loss(logits, loc_map, targets, config, spatial_scale=0.0).total.item() == pytest.approx(ce, rel=1e-6)


def test_area_gradient_single_process():
    loc_map = torch.full((2, 1, 4, 4), 0.5, requires_grad=True)
    parts = sat_loss(torch.zeros(2, 3), loc_map, torch.tensor([0, 1]), SATLossConfig(alpha=0.25, norm_weight=0.0))
    parts.total.backward()
    # d|mean - alpha|/dM = sign(0.5 - 0.25) / count
    torch.testing.assert_close(loc_map.grad, torch.full_like(loc_map, 1 / 32))


def test_bad_map_shape():
    with pytest.raises(ValueError, match="loc_map must be B x 1 x h x w"):
        sat_loss(torch.zeros(2, 3), torch.zeros(2, 4, 4), torch.tensor([0, 1]))


# ---------------------------------------------------------------- two processes, one gloo group


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank: int, world: int, port: int, scenarios: list[dict], out: str, ddp_cases: list[dict]):
    """One rank: the area value and gradient of constant maps, then DDP gradients of a tiny SAT."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        results = []
        for sc in scenarios:
            b = sc["batches"][rank]
            loc_map = torch.full((b, 1, 4, 4), sc["values"][rank], requires_grad=True)
            config = SATLossConfig(alpha=sc["alpha"], norm_weight=0.0)
            parts = sat_loss(torch.zeros(b, 3), loc_map, torch.zeros(b, dtype=torch.long), config)
            parts.total.backward()
            x = torch.arange(b * 16, dtype=torch.float32, requires_grad=True)
            g = global_mean(x)
            g.backward()
            results.append({
                "area": parts.area.item(),
                "grad": loc_map.grad.unique().tolist(),
                "global_mean": g.item(),
                "global_mean_grad": x.grad.unique().tolist(),
            })
        ddp_grads = [_ddp_term_grads(rank, case) for case in ddp_cases]
        with open(out, "w") as f:
            json.dump(results, f)
        torch.save(ddp_grads, out + ".grads.pt")
    finally:
        dist.destroy_process_group()


# A SAT small enough for CPU tests: 32 px, 4 x 4 grid, 2 blocks (both re-weighted).
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, reweight_blocks=2, drop_path_rate=0.0)
TERMS = ("ce", "area", "norm", "total")


def _tiny_sat():
    torch.manual_seed(0)
    return create_model("sat_vit_micro_patch8_64", 3, **TINY)


def _global_batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 3, (n,), generator=g)


def _straddling_alpha(images: torch.Tensor) -> float:
    """An alpha with half the images' map areas above it and half below, so that the two
    area modes differ (with every image on one side, their gradients would be the same)."""
    with torch.no_grad():
        areas = _tiny_sat()(images).loc_map.mean(dim=(1, 2, 3)).sort().values
    mid = len(areas) // 2
    return float(areas[mid - 1] + areas[mid]) / 2


def _term(model, images, labels, mode: str, term: str, alpha: float) -> torch.Tensor:
    out = model(images)
    config = SATLossConfig(alpha=alpha, area_mode=mode)
    if term == "total":
        return sat_loss(out.logits, out.loc_map, labels, config).total
    return sat_loss_terms(out.logits, out.loc_map, labels, config)[TERMS.index(term)]


def _grads(model) -> dict[str, torch.Tensor]:
    return {
        n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
        for n, p in model.named_parameters()
    }


def _ddp_term_grads(rank: int, case: dict) -> dict[str, dict[str, torch.Tensor]]:
    """Per term, every parameter's gradient after DDP's averaging, on this rank's slice."""
    from torch.nn.parallel import DistributedDataParallel

    images, labels = _global_batch(sum(case["batches"]))
    start = sum(case["batches"][:rank])
    mine = slice(start, start + case["batches"][rank])
    alpha = _straddling_alpha(images)
    grads = {}
    for term in TERMS:
        ddp = DistributedDataParallel(_tiny_sat(), find_unused_parameters=True)
        _term(ddp, images[mine], labels[mine], case["mode"], term, alpha).backward()
        grads[term] = _grads(ddp.module)
    return grads


def run_two_ranks(
    tmp_path, scenarios: list[dict], ddp_cases: list[dict] = (), timeout: float = 120.0
) -> tuple[list[list[dict]], list[list[dict]]]:
    """Per scenario the two ranks' results; per DDP case the two ranks' gradients."""
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    outs = [str(tmp_path / f"rank{r}.json") for r in range(2)]
    procs = [ctx.Process(target=_rank_worker, args=(r, 2, port, scenarios, outs[r], list(ddp_cases))) for r in range(2)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout)
    finally:
        alive = [p for p in procs if p.is_alive()]
        for p in alive:  # only the processes this test started
            p.terminate()
            p.join(10)
    assert not alive, f"ranks did not finish within {timeout}s"
    assert [p.exitcode for p in procs] == [0, 0]
    per_rank = []
    for path in outs:
        with open(path) as f:
            per_rank.append(json.load(f))
    grads = [torch.load(path + ".grads.pt", weights_only=True) for path in outs]
    return list(zip(*per_rank)), list(zip(*grads))


DDP_CASES = [
    dict(mode="batch", batches=[2, 2]),
    dict(mode="image", batches=[2, 2]),
    # Unequal batches: a plain local mean would weigh rank 0's one image up (CE and norm too).
    dict(mode="batch", batches=[1, 3]),
    dict(mode="image", batches=[1, 3]),
]


def gradient_ratio(ddp: dict[str, torch.Tensor], one: dict[str, torch.Tensor]) -> float:
    """Least-squares scale of DDP's gradient against one process's, over all parameters."""
    a = torch.cat([ddp[n].flatten().double() for n in one])
    b = torch.cat([one[n].flatten().double() for n in one])
    return float(a @ b / (b @ b))


@pytest.mark.timeout(240)
def test_ddp_gradients_equal_one_process_on_the_concatenated_batch(tmp_path):
    """2 gloo ranks, a tiny SAT in DistributedDataParallel: for each term of both area modes,
    every parameter's gradient equals one process's on the concatenated batch (rtol 1e-5)."""
    _, per_case = run_two_ranks(tmp_path, [], DDP_CASES)
    torch.set_num_threads(1)
    ratios, area_grads = {}, {}
    for case, (rank0, rank1) in zip(DDP_CASES, per_case):
        images, labels = _global_batch(sum(case["batches"]))
        alpha = _straddling_alpha(images)
        for term in TERMS:
            model = _tiny_sat()
            _term(model, images, labels, case["mode"], term, alpha).backward()
            one = _grads(model)
            if term == "area":
                area_grads[case["mode"], len(images)] = one
            scale = max(g.abs().max().item() for g in one.values())
            assert scale > 0
            for name, expected in one.items():
                # DDP leaves the same averaged gradient on both ranks.
                torch.testing.assert_close(rank1[term][name], rank0[term][name], rtol=0, atol=0)
                torch.testing.assert_close(
                    rank0[term][name], expected, rtol=1e-5, atol=1e-6 * scale,
                    msg=lambda m, n=name, t=term, c=case: f"{c} {t} {n}: {m}",
                )
            ratios[f"{case['mode']} {case['batches']} {term}"] = gradient_ratio(rank0[term], one)
    print("DDP / one-process gradient ratio:", json.dumps(ratios, indent=1))
    assert all(r == pytest.approx(1.0, abs=1e-5) for r in ratios.values())
    # The two area modes really train differently here (so both were put to the test).
    for n in (4,):
        batch, image = area_grads["batch", n], area_grads["image", n]
        assert max((batch[k] - image[k]).abs().max().item() for k in batch) > 1e-4


@pytest.mark.timeout(240)
def test_area_term_uses_the_global_batch(tmp_path):
    (equal, unequal), _ = run_two_ranks(
        tmp_path,
        [
            # rank 0 all 1, rank 1 all 0, equal batches -> global mean 0.5 on both ranks.
            dict(batches=[2, 2], values=[1.0, 0.0], alpha=0.25),
            # Unequal batches weigh by element count: 1 map of ones + 3 maps of zeros -> 0.25.
            dict(batches=[1, 3], values=[1.0, 0.0], alpha=0.35),
        ],
    )
    # The local gradient is W / N_global per element: DDP's averaging over the W = 2 ranks
    # then leaves 1 / N_global, as on one process (1 / N_global locally trained at 1 / W).
    for r in equal:
        assert r["area"] == pytest.approx(abs(0.5 - 0.25), abs=1e-6)  # not 0.75 / 0.25 per rank
        assert r["grad"] == pytest.approx([2 / 64])  # sign(+) x 2 ranks / global count (2 x 2 x 16)
        # global_mean of arange: each rank holds 0..31 -> 15.5; local gradient 2 / 64.
        assert r["global_mean"] == pytest.approx(15.5)
        assert r["global_mean_grad"] == pytest.approx([2 / 64])
    for r in unequal:
        assert r["area"] == pytest.approx(0.10, abs=1e-6)
        assert r["grad"] == pytest.approx([-2 / 64])  # sign(0.25 - 0.35) x 2 / (4 x 16)
        # arange: rank 0 holds 0..15 (sum 120), rank 1 0..47 (sum 1128) -> 1248 / 64.
        assert r["global_mean"] == pytest.approx(1248 / 64)
        assert r["global_mean_grad"] == pytest.approx([2 / 64])
