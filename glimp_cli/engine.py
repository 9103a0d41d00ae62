"""Wire a resolved pair into a Router: load the backends the policy needs, build the settings."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from glimp_cli.config import PairSpec, Registry
from glimp_cli.entropy import parse_estimator
from glimp_cli.policies import Policy, make_policy
from glimp_cli.router import RouteSettings, Router
from glimp_cli.sampling import Sampling
from glimp_cli.sides import ModelSlot


def route_settings(pair: PairSpec) -> RouteSettings:
    """The loop settings a pair spells out."""
    return RouteSettings(
        delimiter=pair.delimiter,
        estimator=parse_estimator(pair.estimator),
        sampling=Sampling(pair.temperature, pair.top_p),
        seed=pair.seed,
        max_tokens=pair.max_tokens,
        max_step_tokens=pair.max_step_tokens,
        probe_skip=pair.probe_skip,
        forced_answer_tokens=pair.forced_answer_tokens,
        probe_at=pair.probe_at,
    )


def pair_policy(pair: PairSpec, probe_baseline: bool = False) -> Policy:
    """The routing policy for the pair's mode."""
    return make_policy(pair.mode, pair.tau, pair.large_share, probe_baseline,
                       pair.step_entropy_threshold, pair.step_perplexity_threshold,
                       adaptive_share=pair.large_share, tau_after_large=pair.tau_after_large)


@dataclass
class Engine:
    """The loaded models of a pair; reuse it for many questions, close it once."""

    registry: Registry
    pair: PairSpec
    backends: dict  # role -> Backend, only the roles some policy needed
    prompt_cache: bool = False  # the routers' RouteSettings.prompt_cache (glimp serve turns it on)

    @classmethod
    def load(cls, registry: Registry, pair: PairSpec, roles: set[str]) -> "Engine":
        from glimp_cli.backends import load_backend

        backends = {}
        try:
            for role in ("small", "large"):
                if role in roles:
                    name = getattr(pair, role)
                    spec = registry.model(name)
                    backends[role] = load_backend(spec, _config_dir(registry, name))
        except BaseException:
            for backend in backends.values():
                backend.close()
            raise
        return cls(registry, pair, backends)

    def router(self, policy: Policy, pair: PairSpec | None = None) -> Router:
        """A Router over the loaded models with `policy` and the (possibly overridden) pair."""
        pair = pair or self.pair
        slots = [
            ModelSlot(role, self.backends.get(role), self.registry.model(getattr(pair, role)).prompt,
                      self.registry.model(getattr(pair, role)).stop)
            for role in ("small", "large")
        ]
        return Router(slots[0], slots[1], policy, replace(route_settings(pair), prompt_cache=self.prompt_cache))

    def close(self) -> None:
        for backend in self.backends.values():
            backend.close()
        self.backends = {}


def _config_dir(registry: Registry, model: str) -> Path | None:
    origin = registry.origin.get(f"models.{model}")
    return origin.parent if origin else None
