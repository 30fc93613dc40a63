"""Step cost of MoSA against the dense adapter and the N-copies reference, in one process.

Same frozen tower, same batch, same adapter config (parallel, r 64, share down); only N and the
training scheme differ:

* ``dense``: N = 1, one adapter, AdamW.
* ``mosa``: N experts in one adapter's storage (``SparseExpertLinear``), ``MoSAAdamW``.
* ``reference``: the authors' scheme: N full copies of every split weight, the active copy's
  gradient masked after backward, stock ``torch.optim.AdamW`` (MOSA_SPEC section 4).

Every variant first runs N steps with expert k = 0..N-1 everywhere, so every slice / copy has
optimizer state (the steady state), then the timed steps run round-robin over the variants with
random routing (shared CPUs: interleaving keeps the ratios fair). Prints JSON.

Memory: resident bytes of the variant (frozen + trainable values + Adam state) plus the step's
transient peak: measured by the CUDA allocator on a GPU; on a CPU, estimated as the gradients plus
the tensors autograd saves for backward.

    python bench/step_cost.py                       # CPU size (tiny HF ViT), fp32
    python bench/step_cost.py --device cuda         # OpenCLIP ViT-H-14, bf16 tower, batch 32
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from mosa_scale.adapters import AdapterConfig, inject_adapters
from mosa_scale.backbones import BackboneConfig, build_backbone, build_head
from mosa_scale.model.assembly import AdaptedClassifier
from mosa_scale.optim import MoSAAdamW, sparse_layers
from mosa_scale.sparse import Router, SparseExpertLinear
from mosa_scale.sparse.routing import Window

CPU_TOWER = BackboneConfig(
    family="hf-vit",
    pooling="mean",
    hf_config=dict(
        hidden_size=256,
        num_hidden_layers=6,
        num_attention_heads=4,
        intermediate_size=1024,
        image_size=64,
        patch_size=8,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    ),
)
GPU_TOWER = BackboneConfig(family="openclip", name="ViT-H-14", precision="bf16")
CLASSES, LR, WD = 100, 1e-3, 0.01


class CopiesLinear(nn.Module):
    """The reference for one split projection: N full copies starting at W0, each with its mask."""

    def __init__(self, layer: SparseExpertLinear) -> None:
        super().__init__()
        n, shape = layer.num_experts, (layer.out_features, layer.in_features)
        w0 = layer.base.reshape(shape) if layer.base.numel() else torch.zeros(shape)
        assign = layer.assign.reshape(shape).long()
        self.register_buffer("masks", torch.stack([(assign == k) for k in range(n)]).float())
        self.weights = nn.ParameterList(nn.Parameter(w0.clone()) for _ in range(n))
        bias = layer.has_bias
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(shape[0])) for _ in range(n)) if bias else None
        self.route_id, self.router = layer.route_id, [layer._router[0]]
        self.k = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        self.k = self.router[0].choice(self.route_id)
        bias = None if self.biases is None else self.biases[self.k]
        return F.linear(x.to(self.weights[0].dtype), self.weights[self.k], bias)

    def mask_grad(self) -> None:  # the authors' `p.grad *= p.mask` after backward
        w = self.weights[self.k]
        if w.grad is not None:
            w.grad.mul_(self.masks[self.k])


def build(tower: BackboneConfig, experts: int, *, seed: int, device: torch.device, reference: bool):
    torch.manual_seed(seed)  # the same frozen weights in every variant
    bb = build_backbone(tower, device=device)
    router = Router(seed)
    width = int(bb.model.get_submodule(bb.sites[0].ln2).normalized_shape[0])
    cfg = AdapterConfig(method="parallel", bottleneck=64, num_experts=experts, share="down")
    inject_adapters(bb.model, bb.sites, cfg, seed=seed, router=router, width=width)
    model = AdaptedClassifier(
        bb.model, build_head("linear", bb.width, CLASSES, generator=torch.Generator().manual_seed(seed))
    )
    copies = []
    if reference:
        for name, layer in sparse_layers(model).items():
            parent, attr = name.rsplit(".", 1)
            copies.append(CopiesLinear(layer))
            setattr(model.get_submodule(parent), attr, copies[-1])
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=LR, weight_decay=WD, eps=1e-6)
    else:
        opt = MoSAAdamW.for_model(model, router=router, weight_decay=WD, lr=LR, eps=1e-6)
    model.to(device).train()
    return model, router, opt, copies, bb


def fixed_window(router: Router, step: int, k: int) -> None:
    """Routes every split projection to expert k (warm-up: every slice gets optimizer state)."""
    routes = len(router.num_experts)
    choices = torch.full((1, 1, 1, routes), k, dtype=torch.int64)
    counts = torch.zeros((routes, max(router.num_experts, default=1)), dtype=torch.int64)
    counts[:, k] = 1
    router.window = Window(step=step, choices=choices, counts=counts, active=frozenset((r, k) for r in range(routes)))


class SavedBytes:
    """Bytes autograd saves for backward (activations; parameters excluded), one storage once."""

    def __init__(self, params: set[int]) -> None:
        self.params, self.seen, self.total = params, set(), 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in self.seen and key not in self.params:
            self.seen.add(key)
            self.total += t.untyped_storage().nbytes()
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


def one_step(v: dict, x: torch.Tensor, y: torch.Tensor, step: int, warm_k: int | None) -> dict:
    dev = x.device
    if warm_k is None:
        v["router"].begin_step(step)
    else:
        fixed_window(v["router"], step, warm_k)
    saved = SavedBytes({p.untyped_storage().data_ptr() for p in v["model"].parameters()})
    if dev.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with v["router"].forward_pass(), saved.hooks():
        loss = F.cross_entropy(v["model"](x).float(), y)
    loss.backward()
    for c in v["copies"]:
        c.mask_grad()
    grad_bytes = sum(p.grad.nbytes for p in v["model"].parameters() if p.grad is not None)
    v["opt"].step()
    v["opt"].zero_grad(set_to_none=True)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    transient = (torch.cuda.max_memory_allocated() - base) if dev.type == "cuda" else saved.total + grad_bytes
    return {"time": dt, "transient": transient}


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(t.nbytes for st in opt.state.values() for t in st.values() if torch.is_tensor(t))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--batch", type=int, default=None, help="default 16 on CPU, 32 on GPU")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    args = ap.parse_args()
    dev = torch.device(args.device)
    tower = GPU_TOWER if dev.type == "cuda" else CPU_TOWER
    batch = args.batch or (32 if dev.type == "cuda" else 16)
    variants = {}
    for name, experts, ref in (("dense", 1, False), ("mosa", args.experts, False), ("reference", args.experts, True)):
        model, router, opt, copies, bb = build(tower, experts, seed=0, device=dev, reference=ref)
        variants[name] = dict(model=model, router=router, opt=opt, copies=copies, times=[], transient=[])
    size = bb.image.size
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=g).to(dev)
    y = torch.randint(CLASSES, (batch,), generator=g).to(dev)
    for name, v in variants.items():  # warm-up: every expert once, so all optimizer state exists
        for k in range(args.experts if name != "dense" else 2):
            one_step(v, x, y, step=k, warm_k=k if name != "dense" else 0)
    names = list(variants)
    for i in range(args.steps):
        for name in names[i % 3 :] + names[: i % 3]:  # rotate the order every round
            r = one_step(variants[name], x, y, step=100 + i, warm_k=None)
            variants[name]["times"].append(r["time"])
            variants[name]["transient"].append(r["transient"])
    out: dict = {
        "bench": "step_cost",
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine(),
        "tower": tower.name if tower.family == "openclip" else "hf-vit " + json.dumps(dict(tower.hf_config)),
        "precision": tower.precision,
        "batch": batch,
        "image_size": size,
        "experts": args.experts,
        "bottleneck": 64,
        "timed_steps": args.steps,
        "cpu_threads": torch.get_num_threads(),
        "variants": {},
    }
    for name, v in variants.items():
        model = v["model"]
        trainable = [p for p in model.parameters() if p.requires_grad]
        frozen_b = sum(p.nbytes for p in model.parameters() if not p.requires_grad)
        train_b = sum(p.nbytes for p in trainable)
        opt_b = state_bytes(v["opt"])
        resident = frozen_b + train_b + opt_b
        out["variants"][name] = {
            "step_ms_median": 1e3 * statistics.median(v["times"]),
            "step_ms_min": 1e3 * min(v["times"]),
            "trainable_elements": sum(p.numel() for p in trainable),
            "trainable_bytes": train_b,
            "optimizer_state_bytes": opt_b,
            "frozen_bytes": frozen_b,
            "peak_mb": (resident + max(v["transient"])) / 2**20,
            "param_groups": len(v["opt"].param_groups),
        }
    out["peak_source"] = (
        "resident + CUDA allocator peak of the step"
        if dev.type == "cuda"
        else "resident + gradients + tensors saved for backward (CPU estimate)"
    )
    d, m, r = (out["variants"][k] for k in ("dense", "mosa", "reference"))
    for key, col in (
        ("step_time", "step_ms_median"),
        ("optimizer_state", "optimizer_state_bytes"),
        ("trainable", "trainable_elements"),
        ("peak_memory", "peak_mb"),
    ):
        out[f"{key}_ratio_mosa_vs_dense"] = m[col] / d[col]
        out[f"{key}_ratio_reference_vs_dense"] = r[col] / d[col]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
