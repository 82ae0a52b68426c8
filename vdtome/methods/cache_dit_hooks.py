"""cache-dit applied with vdtome's strictness (the declaration: :mod:`vdtome.methods.cache_dit`).

cache-dit's ``enable_cache`` patches the pipeline *class*'s ``__call__`` (every instance of the
class runs through it while it is on, and a second pipeline's enable wraps the first's), and its
``disable_cache`` leaves the transformer's ``forward`` as an instance attribute. Here:
* the pipeline is given a private subclass of its class (same name, so cache-dit finds its adapter)
  for as long as the cache is on: the class cache-dit patches is that one, never the class another
  pipeline in the same process (the app's pipeline cache) is an instance of;
* what ``disable_cache`` leaves behind on the pipeline and on every module of its denoisers
  (instance attributes added or replaced, the entries of their module, parameter and hook tables) is
  put back as it was, so the pipeline after ``remove`` is the one before ``apply``.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from vdtome.core.denoisers import denoisers_of
from vdtome.core.validation import RequestError
from vdtome.methods.base import Evidence, MethodReport
from vdtome.methods.cache_dit import NAME, CacheDiT, summary
from vdtome.methods.evidence import ComputeSpy, transformer_blocks

# The tables inside a module's __dict__ whose entries cache-dit may add to or replace.
_TABLES = ("_modules", "_parameters", "_buffers", "_forward_pre_hooks", "_forward_hooks")


class InstanceState:
    """The instance attributes of ``objects`` (and their modules' tables), to put back exactly."""

    def __init__(self, objects: list[Any]) -> None:
        self._saved = [(obj, dict(vars(obj)), {name: dict(vars(obj)[name]) for name in _TABLES if name in vars(obj)})
                       for obj in objects]

    def changed(self) -> list[str]:
        """What differs now: ``Class.attribute`` for each attribute added, removed or replaced."""
        out = []
        for obj, attributes, tables in self._saved:
            now = vars(obj)
            names = {key for key in now.keys() | attributes.keys()
                     if key not in attributes or key not in now or now[key] is not attributes[key]}
            names |= {f"{table}[{key}]" for table, saved in tables.items()
                      for key in now[table].keys() | saved.keys()
                      if key not in saved or key not in now[table] or now[table][key] is not saved[key]}
            out += [f"{type(obj).__name__}.{name}" for name in sorted(names)]
        return out

    def restore(self) -> None:
        for obj, attributes, tables in self._saved:
            now = vars(obj)
            for key in set(now) - set(attributes):
                del now[key]
            now.update(attributes)
            for name, saved in tables.items():
                now[name].clear()
                now[name].update(saved)


@contextlib.contextmanager
def _quiet():
    """cache-dit logs each enable, summary and disable at INFO/WARNING: kept out of a comparison's output."""
    root = logging.getLogger("cache_dit")
    loggers = [root, *(logger for name, logger in logging.root.manager.loggerDict.items()
                       if name.startswith("cache_dit.") and isinstance(logger, logging.Logger))]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _cache_configs(config: CacheDiT) -> dict[str, Any]:
    from cache_dit import DBCacheConfig, TaylorSeerCalibratorConfig

    cache = DBCacheConfig(Fn_compute_blocks=config.compute_first, Bn_compute_blocks=config.compute_last,
                          residual_diff_threshold=config.threshold, max_warmup_steps=config.warmup_steps,
                          max_cached_steps=config.max_cached_steps or -1)
    calibrator = TaylorSeerCalibratorConfig(taylorseer_order=config.taylorseer_order) if config.taylorseer else None
    return {"cache_config": cache, "calibrator_config": calibrator}


class AppliedCacheDiT:
    def __init__(self, pipe: Any, config: CacheDiT) -> None:
        import cache_dit

        self.config = config
        self.pipe = pipe
        self.models = list(denoisers_of(pipe))
        blocks = min(len(transformer_blocks(model)) for model in self.models)
        if config.compute_first + config.compute_last > blocks:
            field = "cache_dit_compute_last" if config.compute_first <= blocks else "cache_dit_compute_first"
            raise RequestError(f"cache-dit: Fn {config.compute_first} + Bn {config.compute_last} blocks computed "
                               f"every step is more than the {blocks} transformer blocks of this model: nothing "
                               "would be left to cache", field)
        self.state = InstanceState([pipe, *(m for model in self.models for m in model.modules())])
        self.pipeline_class = type(pipe)
        pipe.__class__ = type(self.pipeline_class.__name__, (self.pipeline_class,),
                              {"__module__": self.pipeline_class.__module__,
                               "__doc__": "a private subclass cache-dit patches (vdtome.methods.cache_dit_hooks)"})
        self.spy = None
        try:
            with _quiet():
                cache_dit.enable_cache(pipe, **_cache_configs(config))
            self.spy = ComputeSpy(self.models)
        except BaseException:
            self.remove()
            raise

    def reset(self) -> None:
        self.spy.reset()  # cache-dit resets its own context at every pipeline call

    def remove(self) -> None:
        if self.pipe is None:
            return
        import cache_dit

        if self.spy is not None:
            self.spy.remove()
        with _quiet():
            cache_dit.disable_cache(self.pipe)
        self.pipe.__class__ = self.pipeline_class
        self.state.restore()
        self.pipe = None

    def _stats(self) -> list[Any]:
        import cache_dit

        with _quiet():
            stats = cache_dit.summary(self.pipe, logging=False)
        return [s for s in stats if s.cache_options]

    def report(self) -> MethodReport:
        stats = self._stats() if self.pipe is not None else []
        # One entry per cached block list and one per transformer: the transformer's carry the step counts.
        cached = max((len(s.cached_steps) for s in stats), default=0)
        cfg_cached = max((len(s.cfg_cached_steps) for s in stats), default=0)
        executed = max((s.accumulated_executed_steps for s in stats), default=0)
        spy = self.spy
        rows = [("steps cached (cache-dit's count)", f"{cached} of {executed}" if executed else str(cached),
                 "conditional branch" if cfg_cached else "")]
        if cfg_cached:
            rows.append(("steps cached, unconditional branch", str(cfg_cached), ""))
        return MethodReport(
            method=NAME,
            summary={"settings": summary(self.config), "steps cached": cached},
            rows=tuple(rows),
            detail={"cached_steps": [sorted(s.cached_steps) for s in stats if s.cached_steps],
                    "cfg_cached_steps": [sorted(s.cfg_cached_steps) for s in stats if s.cfg_cached_steps],
                    "executed_steps": executed,
                    "expected_block_computations": spy.expected_blocks if spy else 0,
                    "block_computations": spy.blocks_run if spy else 0},
            evidence=(*(spy.evidence()[:1] if spy else ()),
                      Evidence("steps whose middle blocks cache-dit cached (its own count)", cached, executed or None)),
        )

