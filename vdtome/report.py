"""A comparison result as rows of human-readable figures (shared by the CLI table and the app)."""

from __future__ import annotations

from .compare import ComparisonResult
from .metrics import PSNR_CAP_DB

COLUMNS = ("metric", "baseline", "accelerated", "change")


def _seconds(ms: float | None) -> str:
    return "n/a" if ms is None else f"{ms / 1000:.3f} s"


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f} MiB"


def _ratio(base: float | None, fast: float | None, better_lower: bool = True) -> str:
    if not base or not fast:
        return ""
    return f"{base / fast:.2f}x faster" if better_lower and fast <= base else f"{fast / base:.2f}x"


def metric_rows(result: ComparisonResult) -> list[tuple[str, str, str, str]]:
    base, fast = result.baseline, result.accelerated
    rows: list[tuple[str, str, str, str]] = []

    def timing(label: str, phase: str) -> None:
        b = None if base is None else base.timing.get(phase)
        f = None if fast is None else fast.timing.get(phase)
        speedup = result.speedup(phase)
        rows.append((label, _seconds(b), _seconds(f), "" if speedup is None else f"{speedup:.2f}x speedup"))

    timing("end-to-end latency", "end_to_end")
    timing("denoising loop", "denoising")
    timing("text encoding", "text_encoding")
    timing("VAE decode", "vae_decode")
    b_step = None if base is None else base.seconds_per_step
    f_step = None if fast is None else fast.seconds_per_step
    rows.append(
        (
            "s / step",
            "n/a" if b_step is None else f"{b_step:.4f}",
            "n/a" if f_step is None else f"{f_step:.4f}",
            "",
        )
    )
    b_mem = None if base is None else base.memory.peak_bytes
    f_mem = None if fast is None else fast.memory.peak_bytes
    change = result.memory_change_bytes
    memory_kind = "peak CUDA allocated" if base is not None and base.memory.device.startswith("cuda") else "peak RSS growth"
    rows.append(
        (memory_kind, _mib(b_mem), _mib(f_mem), "" if change is None else f"{change / 2**20:+.1f} MiB")
    )
    report = result.method_report
    if "requested_ratio" in report:
        rows.append(
            (
                "merge ratio (requested / effective)",
                "0",
                f"{report['requested_ratio']:.2f} / {report['effective_ratio']:.2f}",
                f"{report['blocks_patched']}/{report['blocks_total']} blocks",
            )
        )
    fid = result.fidelity
    if fid is not None:
        psnr = "identical" if fid.identical else f"{fid.psnr_mean:.2f} dB"
        if not fid.identical and fid.psnr_mean >= PSNR_CAP_DB:
            psnr = f">= {PSNR_CAP_DB:.0f} dB"
        rows.append(("PSNR vs baseline", "reference", psnr, ""))
        rows.append(("SSIM vs baseline", "reference", f"{fid.ssim_mean:.4f}", ""))
        rows.append(("MSE vs baseline", "reference", f"{fid.mse_mean:.3g}", ""))
    for label, attribute in (("warp error (flow)", "warp_error_mean"), ("frame-to-frame difference", "frame_diff_mean")):
        values = [
            None if run is None or run.temporal is None else getattr(run.temporal, attribute) for run in (base, fast)
        ]
        rows.append((label, *("n/a" if v is None else f"{v:.4f}" for v in values), ""))
    rows.append(("baseline from cache", "yes" if result.baseline_reused else "no", "", ""))
    return rows


def environment_line(result: ComparisonResult) -> str:
    env = result.environment
    versions = env.get("versions", {})
    parts = [
        str(env.get("device_name") or env.get("device", "?")),
        f"driver {env['nvml_driver_version']}" if env.get("nvml_driver_version") else None,
        f"torch {versions.get('torch', '?')}",
        f"diffusers {versions.get('diffusers', '?')}",
        f"dtype {env.get('dtype', '?')}",
        f"attention {env.get('attention_backend', '?')}",
    ]
    return " · ".join(part for part in parts if part)


def format_table(result: ComparisonResult) -> str:
    rows = [COLUMNS, *metric_rows(result)]
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(COLUMNS))]
    lines = [" | ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "-+-".join("-" * width for width in widths))
    s = result.settings
    head = [
        f"{s.preset}: {s.frames} frames, {s.height}x{s.width}, {s.steps} steps, guidance {s.guidance:g}, seed {s.seed}",
        environment_line(result),
    ]
    tail = [f"note: {note}" for note in result.notes]
    if result.error:
        tail.append(f"error: {result.error}")
    tail += [f"{name}: {path}" for name, path in result.files.items()]
    return "\n".join(head + [""] + lines + [""] + tail)
