"""ninlab: Network in Network (d2l.ai) as software."""

from ninlab.models import NiNConfig, build_nin, get_config, list_configs, resolve_model

__all__ = ["NiNConfig", "build_nin", "get_config", "list_configs", "resolve_model"]
