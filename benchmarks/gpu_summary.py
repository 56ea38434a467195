"""The GPU pass's results as README-ready markdown, from what benchmarks/gpu_check.sh leaves behind.

    python -m benchmarks.gpu_summary OUT TABLES > summary.md

OUT holds env.txt, tests.log and finetune.log; TABLES the CSVs (bench_*.csv, loss_curves.csv, parts.csv) and
backend_report.txt. Every number printed is read from those files; a part that did not run, failed, or was cut
short by its time cap says so in place of its numbers. Each table's title line names the GPU, driver, torch and
triton versions and the date, and each ratio is set against the issue's target.
"""

from __future__ import annotations

import csv
import os
import re
import sys
from collections.abc import Sequence

__all__ = ["TARGETS", "summarize", "main"]

# Issue 14's targets, as ratios (one run).
TARGETS = {
    "attention": 1.1,  # fwd+bwd vs the best SDPA backend
    "layer_norm": 1.5,  # fwd+bwd vs F.layer_norm
    "linear_gelu": 1.1,  # fwd+bwd vs F.linear + F.gelu (cuBLAS + a separate GELU kernel)
    "train_vs_timm": 1.25,  # auto, whole ViT-B_16 step, vs timm eager
    "train_vs_timm_compiled": 1.0,
    "mfu": 0.5,
}


def _read_csv(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _read_env(out: str) -> dict[str, str]:
    env = {}
    path = os.path.join(out, "env.txt")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep:
                    env[key.strip()] = value.strip()
    return env


def _f(v, digits: int = 3) -> str:
    """A number from a CSV cell, to `digits` significant digits; '—' for an empty cell."""
    if v in (None, ""):
        return "—"
    x = float(v)
    return f"{x:.0f}" if abs(x) >= 10 ** digits else f"{x:.{digits}g}"


def _dtypes(rows: Sequence[dict]) -> str:
    return ", ".join(dict.fromkeys(r["dtype"] for r in rows)) or "no rows"


def _by_shape(rows: Sequence[dict]) -> dict[str, list[dict]]:
    """A microbenchmark's rows grouped per measured case (shape, batch, dtype), labelled by what varies."""
    several = len({r["dtype"] for r in rows}) > 1
    groups: dict[str, list[dict]] = {}
    for r in rows:
        label = r["shape"] + (f" B={r['batch']}" if "batch" in r else "") + (f" {r['dtype']}" if several else "")
        groups.setdefault(label, []).append(r)
    return groups


def _log_sections(text: str) -> dict[str, str]:
    """A log of several parts (gpu_check.sh's `-- NAME (cap Ns, ...)` lines open each) split per part."""
    parts = re.split(r"^-- ([\w-]+) \(cap ", text, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def _pytest_result(text: str) -> str:
    """pytest's closing line ('12 passed, 1 skipped in 30.1s'); for a run stopped early, the outcomes so far."""
    finals = [ln.strip("= ") for ln in text.splitlines() if re.match(r"^=+ .* in [\d.]+s", ln)
              or re.match(r"^\d+(/\d+)? tests? collected", ln)]
    if finals:
        return finals[-1]
    verbose = [ln for ln in text.splitlines() if "::" in ln and not ln.startswith(("FAILED ", "ERROR "))]
    counts = {}
    for ln in verbose:
        m = re.search(r"\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", ln)
        if m:
            counts[m.group(1).lower()] = counts.get(m.group(1).lower(), 0) + 1
    if not text.strip():
        return "not run"
    done = ", ".join(f"{n} {k}" for k, n in counts.items()) or "no test finished"
    stopped = "stopped at its time cap" if "stopped at its" in text else "no closing line"
    return f"{stopped}: {done} (see the log)"


def _x(v) -> str:
    return "—" if v is None else f"{v:.2f}×"


def _verdict(ratio: float | None, target: float) -> str:
    if ratio is None:
        return "not measured"
    return f"met (≥ {target:g}×)" if ratio >= target else f"**missed** (< {target:g}×)"


class Summary:
    def __init__(self, out: str, tables: str) -> None:
        self.out, self.tables = out, tables
        self.env = _read_env(out)
        self.parts = {r["part"]: r for r in _read_csv(os.path.join(tables, "parts.csv"))}
        self.lines: list[str] = []

    # -- helpers ---------------------------------------------------------------------------------------------
    def emit(self, *lines: str) -> None:
        self.lines.extend(lines)

    def stamp(self) -> str:
        """'NVIDIA H200 · driver 580.159.03 · torch 2.11.0+cu130 · triton 3.6.0 · 2026-12-02 10:00 UTC'."""
        gpu = self.env.get("gpu", "")
        driver = f"driver {gpu.split(',')[2].strip()}" if gpu.count(",") >= 2 else "no NVIDIA driver"
        bits = [self.env.get("device", "unknown device"), driver,
                f"torch {self.env.get('torch', '?').split(' |')[0]}", f"triton {self.env.get('triton', '?')}",
                self.env.get("date", "date unknown")]
        text = " · ".join(bits)
        if self.env.get("dry run", "no").startswith("yes"):
            text += " · **DRY RUN on CPU: no number here is a measurement**"
        return text

    def part_note(self, *names: str) -> str | None:
        """Why a part's numbers may be missing: not run, skipped, stopped at its cap, or a nonzero exit."""
        notes = []
        for name in names:
            p = self.parts.get(name)
            if p is None:
                notes.append(f"{name}: not run")
            elif p["rc"] == "skipped":
                notes.append(f"{name}: skipped (no time left)")
            elif p["rc"] == "missing":
                notes.append(f"{name}: not available yet (see bench.log)")
            elif p["rc"] == "124":
                notes.append(f"{name}: stopped at its {p['wall_s']} s cap (later rows missing)")
            elif p["rc"] != "0":
                notes.append(f"{name}: exit {p['rc']} (see bench.log)")
        return "; ".join(notes) or None

    def table(self, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        self.emit("| " + " | ".join(header) + " |", "|" + "---|" * len(header))
        self.emit(*("| " + " | ".join(r) + " |" for r in rows))

    def section(self, title: str, *parts: str) -> None:
        self.emit("", f"### {title}", f"_{self.stamp()}_", "")
        note = self.part_note(*parts) if parts else None
        if note:
            self.emit(f"Not complete: {note}.", "")

    # -- parts -------------------------------------------------------------------------------------------------
    def headline(self) -> None:
        from benchmarks.bench_train_compare import headline

        rows = _read_csv(os.path.join(self.tables, "bench_train_compare.csv"))  # --quick: ViT-B_16's rows first
        self.emit(f"**{headline(rows) if rows else 'ViT-B_16 training: not measured'}** "
                  f"({self.env.get('device', '?')}, {self.env.get('date', '?')})")

    def tests(self) -> None:
        self.section("1. GPU tests (quick `ci` hypothesis profile)", "tests-gpu", "tests-rest")
        path = os.path.join(self.out, "tests.log")
        text = open(path).read() if os.path.exists(path) else ""
        what = {"tests-gpu": "GPU-marked (bf16 kernels vs float64, bf16 model triton vs torch)",
                "tests-rest": "the rest of the kernel, model and `auto` tests, on CUDA"}
        sections = _log_sections(text)
        for name, title in what.items():
            self.emit(f"- {title}: {_pytest_result(sections.get(name, ''))}")
        files = re.search(r"^-- tests-gpu \(cap .*?: .*? -m gpu (.*)$", text, flags=re.M)
        if files:
            self.emit(f"- files: {files.group(1)}")
        problems = [ln for ln in text.splitlines() if ln.startswith(("FAILED ", "ERROR ", "SKIPPED "))]
        if problems:
            self.emit("", "```", *problems[:30], "```")

    def attention(self) -> None:
        rows = _read_csv(os.path.join(self.tables, "bench_attention.csv"))
        self.section(f"2a. Attention, {_dtypes(rows)} (ms; median of do_bench)", "attention")
        out = []
        for shape, rs in _by_shape(rows).items():
            get = {(r["impl"], r["mode"]): r for r in rs}
            sdpa = {r["mode"]: r for r in rs if r["impl"].startswith("sdpa")}  # the script keeps the best per mode
            ms = lambda impl, m, get=get: float(get[(impl, m)]["ms"]) if (impl, m) in get else None
            trio = lambda vals: " / ".join(_f(v) for v in vals)
            ours = [ms("triton", m) for m in ("fwd", "bwd", "fwd+bwd")]
            best = [float(sdpa[m]["ms"]) if m in sdpa else None for m in ("fwd", "bwd", "fwd+bwd")]
            comp = [ms("compile-math", m) for m in ("fwd", "bwd", "fwd+bwd")]
            r0 = rs[0]
            ratio = best[2] / ours[2] if ours[2] and best[2] else None
            vs_comp = comp[2] / ours[2] if ours[2] and comp[2] else None
            out.append([f"{shape} ({r0['B']}, {r0['H']}, {r0['N']}, {r0['D']})", trio(ours),
                        trio(best) + f" ({', '.join(dict.fromkeys(sdpa[m]['impl'] for m in sdpa))})", trio(comp),
                        _x(ratio), _x(vs_comp), _verdict(ratio, TARGETS["attention"])])
        self.table(["shape (B, H, N, D)", "vitcore fwd / bwd / fwd+bwd", "best SDPA fwd / bwd / fwd+bwd (backend)",
                    "torch.compile fwd / bwd / fwd+bwd", "fwd+bwd vs SDPA", "vs compile", "target"], out)

    def layer_norm(self) -> None:
        rows = _read_csv(os.path.join(self.tables, "bench_layer_norm.csv"))
        self.section(f"2b. LayerNorm fwd+bwd, {_dtypes(rows)} (ms, GB/s)", "layer_norm")
        copies = {round(float(r["GB/s"]) / float(r["copy_frac"])) for r in rows if float(r["copy_frac"] or 0)}
        if copies:
            self.emit(f"Device-to-device copy bandwidth measured in the run: {min(copies)} GB/s (read + write).", "")
        out = []
        for shape, rs in _by_shape(rows).items():
            get = {r["impl"]: r for r in rs if r["mode"] == "fwd+bwd"}
            if "triton" not in get:
                continue
            t = get["triton"]
            cell = lambda impl, get=get: (f"{_f(get[impl]['ms'])} ms, {_f(get[impl]['GB/s'])} GB/s "
                                          f"({100 * float(get[impl]['copy_frac']):.0f}% of copy)"
                                          if impl in get else "—")
            ratio = float(get["torch"]["ms"]) / float(t["ms"]) if "torch" in get else None
            vs_comp = float(get["compile"]["ms"]) / float(t["ms"]) if "compile" in get else None
            fwd = {r["impl"]: float(r["ms"]) for r in rs if r["mode"] == "fwd"}
            bwd = {r["impl"]: float(r["ms"]) for r in rs if r["mode"] == "bwd"}
            split = (f"{_x(fwd['torch'] / fwd['triton'])} / {_x(bwd['torch'] / bwd['triton'])}"
                     if {"torch", "triton"} <= fwd.keys() & bwd.keys() else "—")
            out.append([f"{shape} ({t['M']}, {t['N']})", cell("triton"), cell("torch"), cell("compile"),
                        _x(ratio), split, _x(vs_comp), _verdict(ratio, TARGETS["layer_norm"])])
        self.table(["shape (M, N)", "vitcore", "F.layer_norm", "torch.compile", "vs F.layer_norm",
                    "fwd / bwd alone vs F.layer_norm", "vs compile", "target"], out)

    def linear_gelu(self) -> None:
        rows = _read_csv(os.path.join(self.tables, "bench_linear_gelu.csv"))
        self.section(f"2c. Linear+GELU fwd+bwd, {_dtypes(rows)} (ms, TFLOP/s)", "linear_gelu")
        out = []
        for shape, rs in _by_shape(rows).items():
            get = {r["impl"]: r for r in rs if r["mode"] == "fwd+bwd"}
            ours = {k: v for k, v in get.items() if k.startswith("triton")}
            if not ours or "torch" not in get:
                continue
            best = min(ours, key=lambda k: float(ours[k]["ms"]))
            cell = lambda impl, get=get: (f"{_f(get[impl]['ms'])} ms, {_f(get[impl]['tflops'])}"
                                          if impl in get else "—")
            ratio = float(get["torch"]["ms"]) / float(get[best]["ms"])
            vs_comp = float(get["compile"]["ms"]) / float(get[best]["ms"]) if "compile" in get else None
            r0 = get["torch"]
            out.append([f"{shape} ({r0['M']}, {r0['K']} → {r0['N']})", cell("triton-bwd=cublas"),
                        cell("triton-bwd=triton"), cell("torch"), cell("compile"), f"{_x(ratio)} ({best})",
                        _x(vs_comp), _verdict(ratio, TARGETS["linear_gelu"])])
        self.table(["shape (M, K → N)", "vitcore, bwd=cublas", "vitcore, bwd=triton", "F.linear + F.gelu",
                    "torch.compile", "best vitcore vs F.linear + F.gelu", "vs compile", "target"], out)

    def train(self) -> None:
        self.section("3. Training step (forward, backward, clip, SGD step)", "train")
        rows = _read_csv(os.path.join(self.tables, "bench_train_compare.csv"))
        runs: dict[tuple, list[dict]] = {}
        for r in rows:
            runs.setdefault((r["model"], r["img_size"], r["batch"]), []).append(r)
        for (model, _, _), rs in runs.items():
            self.emit(f"{model} at {rs[0]['img_size']} px, batch {rs[0]['batch']}, {rs[0]['precision']}: median "
                      "of the timed steps (warm-up excluded), one process, the same batch on the device for every "
                      "variant.", "")
            out = [[r["variant"], _f(r["img_per_s"], 4), f"{100 * float(r['mfu']):.1f}%" if r["mfu"] else "—",
                    _x(float(r["vs_timm"])) if r["vs_timm"] else "—",
                    _x(float(r["vs_timm+compile"])) if r["vs_timm+compile"] else "—", _f(r["ms_per_step"]),
                    f"{100 * float(r['spread']):.1f}%" if r["spread"] else "—", _f(r["warmup_s"]),
                    _f(r["peak_mem_gib"]), r["status"]] for r in rs]
            self.table(["variant", "img/s", "MFU", "vs timm eager", "vs timm compiled", "ms/step", "spread",
                        "warm-up s", "peak GiB", "status"], out)
            auto = next((r for r in rs if r["variant"] == "auto" and r["status"] == "ok"), None)
            if auto is not None and rs is next(iter(runs.values())):  # the headline's run
                eager = float(auto["vs_timm"]) if auto["vs_timm"] else None
                comp = float(auto["vs_timm+compile"]) if auto["vs_timm+compile"] else None
                mfu = float(auto["mfu"]) if auto["mfu"] else None
                self.emit("", f"Targets (auto): vs timm eager {_x(eager)}: "
                              f"{_verdict(eager, TARGETS['train_vs_timm'])}; vs timm compiled {_x(comp)}: "
                              f"{_verdict(comp, TARGETS['train_vs_timm_compiled'])}; MFU "
                              f"{'—' if mfu is None else f'{100 * mfu:.1f}%'}: "
                              f"{'not measured' if mfu is None else ('met' if mfu >= TARGETS['mfu'] else '**missed**')}"
                              f" (≥ {100 * TARGETS['mfu']:.0f}%).")
            self.emit("")
        if not rows:
            self.emit("No rows.")
        report = os.path.join(self.tables, "backend_report.txt")
        if os.path.exists(report):
            self.emit("What `auto` chose (model.backend_report()):", "", "```", open(report).read().rstrip(), "```")
        else:
            self.emit("`auto`'s choices: no backend_report.txt (auto did not run, or its model has no "
                      "backend_report()).")

    def finetune(self) -> None:
        self.section("4. 200-step fine-tune, both backends from one seed", "finetune")
        rows = _read_csv(os.path.join(self.tables, "loss_curves.csv"))
        if rows:
            r0 = rows[0]
            self.emit(f"{r0['model']} at {r0['img_size']} px, batch {r0['batch']}, {r0['precision']}, "
                      f"synthetic CIFAR-format data held on the device ({r0['device']}); mean training loss per "
                      "block of steps.", "")
            self.table(["steps", "torch", "triton", "difference (of the first loss)"],
                       [[r["steps"], r["torch_mean_loss"], r["triton_mean_loss"],
                         f"{100 * float(r['diff_of_first_loss']):.2f}%"] for r in rows])
            gap = max(float(r["diff_of_first_loss"]) for r in rows)
            bound = float(r0["bound"])
            self.emit("", f"Largest difference {100 * gap:.2f}% of the first loss: "
                          f"{'within' if gap < bound else '**outside**'} the {100 * bound:.0f}% bound.")
        else:
            self.emit("No loss-curve table (the test did not reach it; see finetune.log).")
        path = os.path.join(self.out, "finetune.log")
        text = open(path).read() if os.path.exists(path) else ""
        self.emit(f"pytest tests/test_train_gpu.py: {_pytest_result(_log_sections(text).get('finetune', ''))}")
        problems = [ln for ln in text.splitlines() if ln.startswith(("FAILED ", "ERROR "))]
        if problems:
            self.emit("", "```", *problems[:10], "```")

    def input_pipeline(self) -> None:
        self.section("5. Input pipeline (img/s)", "input", "input-jpeg")
        train = _read_csv(os.path.join(self.tables, "bench_train_compare.csv"))
        auto = next((r for r in train if r["variant"] == "auto" and r["status"] == "ok"), None)  # the headline's
        skip = {"device", "torch", "triton", "date"}
        for label, name in (("CIFAR path: uint8 set on the GPU, augmented there in whole batches", "input_cifar.csv"),
                            ("JPEG folder, streamed by worker processes", "input_jpeg.csv")):
            rows = _read_csv(os.path.join(self.tables, name))
            self.emit(f"{label}:", "")
            if not rows:
                self.emit("not measured.", "")
                continue
            cols = [c for c in rows[0] if c not in skip]
            ratio = f"vs {auto['model']} auto training img/s" if auto else None
            out = []
            for r in rows:
                cells = [_f(r[c], 4) if re.fullmatch(r"-?\d+\.\d*(e-?\d+)?", r[c] or "")
                         else "the generated folder (benchmarks/jpeg_folder.py)" if "vitcore-gpu-check" in r[c]
                         else r[c] for c in cols]
                if ratio and r.get("img_per_s"):
                    cells.append(_x(float(r["img_per_s"]) / float(auto["img_per_s"])))
                out.append(cells)
            self.table(cols + ([ratio] if ratio else []), out)
            self.emit("")

    def timing(self) -> None:
        self.emit("", "### Time per part", "")
        self.table(["part", "cap s", "wall s", "exit"],
                   [[p["part"], p["budget_s"], p["wall_s"], p["rc"]] for p in self.parts.values()])


def summarize(out: str, tables: str) -> str:
    """The whole markdown summary of one GPU pass."""
    s = Summary(out, tables)
    s.emit("## GPU pass (benchmarks/gpu_check.sh)", "", f"_{s.stamp()}_", "")
    for key in ("code sha256", "rev", "timm", "python"):
        if key in s.env:
            s.emit(f"- {key}: {s.env[key]}")
    s.emit("")
    s.headline()
    for part in (s.tests, s.attention, s.layer_norm, s.linear_gelu, s.train, s.finetune, s.input_pipeline):
        try:
            part()
        except Exception as e:  # a malformed table must not cost the other parts their summary
            s.emit("", f"({part.__name__}: could not be summarised: {type(e).__name__}: {e})")
    s.timing()
    return "\n".join(s.lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        raise SystemExit("usage: python -m benchmarks.gpu_summary OUT TABLES")
    sys.stdout.write(summarize(*argv))


if __name__ == "__main__":
    main()
