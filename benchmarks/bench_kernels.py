"""Microbenchmark: the fused inner update against per-tensor ways of doing the same update.

One MAML inner update of every parameter of a (G, D) pair for T task copies: out[t] = θ − α g[t]
(θ shared, α a number), and its backward (dθ = Σ_t dout_t, dg = −α dout). Methods:

    fused      kernels.inner_update on one flat [T, P] buffer holding all of G's and D's parameters
    loop       a Python loop over the parameter tensors: torch.add(θ_i, g_i, alpha=−α)
    foreach    torch._foreach_add over the same tensors
    compiled   torch.compile of the loop (dynamic shapes: one compilation serves every T)

Each row also times a device-to-device copy of a [T, P] buffer in the same run, and reports
GB/s of the ideal traffic, (1 + 2T)·P·4 bytes both ways (read θ and g, write out; read dout,
write dg and dθ), and the share of the copy's bandwidth. On CUDA: triton.testing.do_bench medians
and CUDA launches counted with the torch profiler. On the CPU the Triton kernels do not run (the
interpreter is no benchmark): "fused" is then the registered op's torch reference, no launches.

    python benchmarks/bench_kernels.py --json out.json --markdown out.md
    python benchmarks/bench_kernels.py --archs mlp --tasks 1,64 --directions forward
"""

import argparse
import datetime
import json
import platform
import sys
from collections.abc import Callable

import torch
from kernels.launches import cuda_launches

import kernels
from metagan_dist import build_pair

PAIRS = {"mlp": ("mlp", 64, (1, 28, 28)), "dcgan": ("dcgan", 100, (1, 32, 32))}  # the seed's MLP; DCGAN 32x32
METHODS = ("fused", "loop", "foreach", "compiled")
LR = 0.01


def _loop_update(thetas: list[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.add(theta, g, alpha=-LR) for theta, g in zip(thetas, grads)]


_compiled_update = torch.compile(_loop_update, dynamic=True)


def _updates(theta: torch.Tensor, grads: torch.Tensor, thetas: list, grads_list: list) -> dict[str, Callable]:
    """Each method's forward, as a function of its own inputs."""
    return {
        "fused": lambda: [kernels.inner_update(theta, grads, LR)],
        "loop": lambda: _loop_update(thetas, grads_list),
        "foreach": lambda: torch._foreach_add(thetas, grads_list, alpha=-LR),
        "compiled": lambda: _compiled_update(thetas, grads_list),
    }


def _backward_of(forward: Callable, inputs: list[torch.Tensor], dout: torch.Tensor) -> Callable:
    """A function running the backward of one forward call (graph kept), given the flat dout."""
    outs = forward()
    douts = [dout] if len(outs) == 1 else [d.reshape(o.shape).contiguous() for d, o in zip(_split(dout, outs), outs)]
    return lambda: torch.autograd.grad(outs, inputs, douts, retain_graph=True)


def _split(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(flat.split([o[0].numel() for o in like], dim=1))


class Timer:
    """Median µs and device launches of a callable: do_bench + profiler on CUDA, torch's Timer on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def microseconds(self, fn: Callable) -> float:
        if self.cuda:
            import triton.testing

            return triton.testing.do_bench(fn, return_mode="median") * 1e3
        from torch.utils.benchmark import Timer as TorchTimer

        return TorchTimer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.5).median * 1e6

    def launches(self, fn: Callable) -> int | None:
        return cuda_launches(fn) if self.cuda else None


def bench_case(arch: str, tasks: int, directions: list[str], methods: list[str], timer: Timer, device) -> list[dict]:
    """Every method and direction for one pair at one T, plus the copy measured alongside."""
    G, D = build_pair(*PAIRS[arch])
    shapes = [p.shape for p in (*G.parameters(), *D.parameters())]
    sizes = [s.numel() for s in shapes]
    params = sum(sizes)
    theta = torch.randn(params, device=device)
    grads = torch.randn(tasks, params, device=device)
    thetas = [t.reshape(s).clone() for t, s in zip(theta.split(sizes), shapes)]
    grads_list = [g.reshape(tasks, *s).contiguous() for g, s in zip(grads.split(sizes, dim=1), shapes)]
    copy_dst = torch.empty_like(grads)
    copy_us = timer.microseconds(lambda: copy_dst.copy_(grads))
    copy_gbps = 2 * grads.numel() * 4 / copy_us / 1e3
    ideal_bytes = (1 + 2 * tasks) * params * 4
    rows = []
    for direction in directions:
        if direction == "forward":
            calls = _updates(theta, grads, thetas, grads_list)
        else:
            leaves = [t.detach().requires_grad_() for t in (theta, grads, *thetas, *grads_list)]
            fused_in, loop_in = leaves[:2], leaves[2:]
            calls = _updates(*fused_in, loop_in[: len(thetas)], loop_in[len(thetas) :])
            dout = torch.randn_like(grads)
            calls = {m: _backward_of(f, fused_in if m == "fused" else loop_in, dout) for m, f in calls.items() if m in methods}
        for method in methods:
            us = timer.microseconds(calls[method])
            gbps = ideal_bytes / us / 1e3
            rows.append(dict(
                pair=arch, tensors=len(shapes), params=params, tasks=tasks, direction=direction, method=method,
                us=us, launches=timer.launches(calls[method]), gbps=gbps, copy_gbps=copy_gbps,
                share_of_copy=gbps / copy_gbps,
            ))
        del calls
    return rows


def markdown(rows: list[dict], methods: list[str], cuda: bool) -> str:
    """One line per (pair, T, direction): µs (launches) per method, then the fused kernel's bandwidth."""
    head = ["pair", "P", "T", "dir"] + [f"{m} µs" for m in methods] + ["fused GB/s", "copy GB/s", "fused/copy", "foreach/fused"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = sorted({(r["pair"], r["tasks"], r["direction"]) for r in rows}, key=lambda k: (k[0], k[1], k[2] != "forward"))
    for pair, tasks, direction in keys:
        by = {r["method"]: r for r in rows if (r["pair"], r["tasks"], r["direction"]) == (pair, tasks, direction)}
        cells = [pair, f"{next(iter(by.values()))['params']:,}", str(tasks), direction[:3]]
        for m in methods:
            launches = f" ({by[m]['launches']})" if cuda else ""
            cells.append(f"{by[m]['us']:.1f}{launches}")
        fused = by.get("fused")
        cells += [f"{fused['gbps']:.1f}", f"{fused['copy_gbps']:.1f}", f"{fused['share_of_copy']:.0%}"] if fused else ["", "", ""]
        cells.append(f"{by['foreach']['us'] / fused['us']:.2f}x" if fused and "foreach" in by else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cpu_name() -> str:
    """The CPU model as lscpu shows it (Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--archs", default="mlp,dcgan", help=f"comma list of {sorted(PAIRS)}")
    parser.add_argument("--tasks", default="1,8,64,256", help="comma list of T")
    parser.add_argument("--directions", default="forward,backward")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--json", help="write the rows and the machine here")
    parser.add_argument("--markdown", help="write the table here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    methods = args.methods.split(",")
    timer = Timer(device)
    note = (
        f"CUDA: {torch.cuda.get_device_name(device)}; fused = Triton kernels"
        if device.type == "cuda"
        else f"CPU ({_cpu_name()}, {torch.get_num_threads()} threads): torch paths "
        "only; 'fused' is the registered op's torch reference (the Triton interpreter is not a benchmark)"
    )
    print(note, flush=True)
    rows = []
    for arch in args.archs.split(","):
        for tasks in (int(t) for t in args.tasks.split(",")):
            case = bench_case(arch, tasks, args.directions.split(","), methods, timer, device)
            for r in case:
                print(f"{r['pair']:6} T={r['tasks']:<4} {r['direction']:8} {r['method']:9} {r['us']:12.1f} µs "
                      f"launches={r['launches']} {r['gbps']:8.1f} GB/s ({r['share_of_copy']:.0%} of copy)", flush=True)
            rows += case
            if device.type == "cuda":
                torch.cuda.empty_cache()
    table = markdown(rows, methods, device.type == "cuda")
    print(table)
    meta = dict(
        note=note, device=str(device), torch=torch.__version__, python=platform.python_version(),
        date=datetime.datetime.now().isoformat(timespec="seconds"), command=" ".join(sys.argv), lr=LR,
    )
    if device.type == "cuda":
        import triton

        meta["triton"] = triton.__version__
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(f"{note}\n\n{table}\n")


if __name__ == "__main__":
    main()
