"""Configuration of the EMS vLLM connector and the key space of its blocks.

Settings come from `kv_connector_extra_config`, and an environment variable overrides
each one (documented in docs/vllm.md). Scheduler and worker build the same key space from
the same vLLM config, so both derive identical block keys.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from ems.keys import KeySpace, KVLayout
from ems.pool import physical_memory_bytes

logger = logging.getLogger(__name__)

LOAD_MODES = ("layer", "async", "sync")


PAGE_KINDS = ("auto", "hugetlb", "thp", "small")
SPILL_IO_MODES = ("auto", "uring", "posix")
EVICTION_POLICIES = ("clock", "session")


def _boolean(raw) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


def _integer(raw) -> int:
    """Parse a whole number: an int (not a bool), a float without a fraction, or digits."""
    if isinstance(raw, bool):
        raise ValueError(raw)
    if isinstance(raw, float):
        if not raw.is_integer():
            raise ValueError(raw)
        return int(raw)
    if isinstance(raw, int):
        return raw
    return int(str(raw).strip())


def _text(raw) -> str:
    if not isinstance(raw, str):
        raise ValueError(raw)
    return raw


# setting name -> (environment variable, type, default)
_SETTINGS = {
    "pool_capacity_bytes": ("EMS_POOL_CAPACITY_BYTES", _integer, 1 << 30),
    "pool_name": ("EMS_POOL_NAME", _text, None),
    "pool_pages": ("EMS_POOL_PAGES", _text, "auto"),
    "tenant": ("EMS_TENANT", _text, "default"),
    "load_mode": ("EMS_LOAD_MODE", _text, "layer"),
    "async_saves": ("EMS_ASYNC_SAVES", _boolean, True),
    # Where blocks live: "embedded" (a pool in the worker), "local" (the daemon on this
    # host) or "cluster" (daemons found through ZooKeeper or static peers).
    "mode": ("EMS_MODE", _text, "embedded"),
    "socket_path": ("EMS_SOCKET", _text, None),
    "zookeeper": ("EMS_ZOOKEEPER", _text, None),
    "peers": ("EMS_PEERS", _text, None),
    "cluster": ("EMS_CLUSTER", _text, "default"),
    # Spill tier (embedded mode): a directory for blocks evicted from the pool, its quota,
    # the I/O path, the DRAM eviction policy, and prefetch of waiting requests' blocks.
    "spill_dir": ("EMS_SPILL_DIR", _text, None),
    "spill_bytes": ("EMS_SPILL_BYTES", _integer, None),
    "spill_io": ("EMS_SPILL_IO", _text, "auto"),
    "eviction": ("EMS_EVICTION", _text, "clock"),
    "prefetch": ("EMS_PREFETCH", _boolean, True),
}
MODES = ("embedded", "local", "cluster")
_TYPE_NAMES = {_integer: "a whole number", _text: "a string", _boolean: "a boolean"}


@dataclass(frozen=True)
class ConnectorConfig:
    pool_capacity_bytes: int
    pool_name: str
    pool_pages: str
    tenant: str
    load_mode: str
    async_saves: bool
    mode: str = "embedded"
    socket_path: str | None = None
    zookeeper: str | None = None
    peers: str | None = None
    cluster: str = "default"
    spill_dir: str | None = None
    spill_bytes: int | None = None
    spill_io: str = "auto"
    eviction: str = "clock"
    prefetch: bool = True

    def spill_settings(self) -> dict | None:
        """Return the worker's spill tier settings, or None without a spill directory."""
        if not self.spill_dir:
            return None
        return dict(directory=self.spill_dir, quota_bytes=self.spill_bytes,
                    io=self.spill_io, policy=self.eviction)


def load_config(extra_config: dict, engine_id: str | None) -> ConnectorConfig:
    """Read the connector settings; environment variables win over extra_config."""
    unknown = set(extra_config) - set(_SETTINGS)
    if unknown:
        raise ValueError(f"unknown EMS connector settings {sorted(unknown)}; "
                         f"known: {sorted(_SETTINGS)}")
    values = {}
    for name, (env_name, kind, default) in _SETTINGS.items():
        # A null in extra_config means the default, as an absent setting does.
        raw = os.environ.get(env_name)
        if raw is None:
            raw = extra_config.get(name)
        if raw is None:
            values[name] = default
            continue
        try:
            values[name] = kind(raw)
        except (TypeError, ValueError):
            raise ValueError(f"EMS connector setting {name} (or {env_name}) must be "
                             f"{_TYPE_NAMES[kind]}, got {raw!r}") from None

    capacity, memory = values["pool_capacity_bytes"], physical_memory_bytes()
    if capacity <= 0:
        raise ValueError(f"pool_capacity_bytes must be positive, got {capacity}")
    if capacity > memory:
        # The pool prefaults its whole capacity at start, so it must fit in RAM.
        raise ValueError(f"pool_capacity_bytes {capacity} exceeds this machine's memory "
                         f"({memory} bytes); set it below that, leaving room for vLLM")
    if values["load_mode"] not in LOAD_MODES:
        raise ValueError(f"load_mode (or EMS_LOAD_MODE) must be one of {LOAD_MODES}, got "
                         f"{values['load_mode']!r}")
    if values["pool_pages"] not in PAGE_KINDS:
        raise ValueError(f"pool_pages (or EMS_POOL_PAGES) must be one of {PAGE_KINDS}, got "
                         f"{values['pool_pages']!r}")
    if values["mode"] not in MODES:
        raise ValueError(f"mode (or EMS_MODE) must be one of {MODES}, got {values['mode']!r}")
    if values["mode"] == "local" and not values["socket_path"]:
        raise ValueError("mode 'local' needs socket_path (or EMS_SOCKET): the daemon's "
                         "Unix socket")
    if values["mode"] == "cluster" and not (values["zookeeper"] or values["peers"]):
        raise ValueError("mode 'cluster' needs zookeeper (EMS_ZOOKEEPER) or peers (EMS_PEERS)")
    if values["spill_dir"] is not None:
        if values["mode"] != "embedded":
            raise ValueError("spill_dir (or EMS_SPILL_DIR) applies to mode 'embedded'; a "
                             "daemon's spill directory is set with `ems serve --spill-dir`")
        if not values["spill_bytes"] or values["spill_bytes"] <= 0:
            raise ValueError("spill_dir needs spill_bytes (or EMS_SPILL_BYTES), the "
                             f"directory's quota in bytes, got {values['spill_bytes']!r}")
    if values["spill_io"] not in SPILL_IO_MODES:
        raise ValueError(f"spill_io (or EMS_SPILL_IO) must be one of {SPILL_IO_MODES}, got "
                         f"{values['spill_io']!r}")
    if values["eviction"] not in EVICTION_POLICIES:
        raise ValueError(f"eviction (or EMS_EVICTION) must be one of {EVICTION_POLICIES}, "
                         f"got {values['eviction']!r}")
    if values["pool_name"] is None:
        # Both vLLM processes get the same engine_id, so they agree on the pool name.
        values["pool_name"] = f"ems-vllm-{engine_id or os.getppid()}"
    return ConnectorConfig(**values)


def _attention_encoding(vllm_config, dtype, block_size: int, head_size: int) -> str:
    """Name the byte order inside a KV block. vLLM's CPU backend picks its attention
    kernel by ISA, and the AMX and vector kernels lay K and V out differently."""
    device = str(getattr(vllm_config.device_config, "device_type", "cpu"))
    if device != "cpu":
        return device
    try:
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa
        return "cpu-" + _get_attn_isa(dtype, block_size, head_size,
                                      vllm_config.cache_config.cache_dtype)
    except Exception as exc:  # a private helper of vLLM: fall back to a coarser name
        logger.warning("cannot read vLLM's CPU attention ISA (%s); keys name only the "
                       "device", exc)
        return "cpu"


def key_space(vllm_config, tenant: str, rank: int) -> KeySpace:
    """Build the key space for this model, KV layout and tensor-parallel rank."""
    model_config = vllm_config.model_config
    parallel_config = vllm_config.parallel_config
    cache_config = vllm_config.cache_config
    head_size = model_config.get_head_size()
    dtype = model_config.dtype
    layout = KVLayout(
        dtype=str(dtype if cache_config.cache_dtype == "auto" else cache_config.cache_dtype),
        block_size=cache_config.block_size,
        num_kv_heads=model_config.get_num_kv_heads(parallel_config),
        head_size=head_size,
        num_layers=model_config.get_num_layers(parallel_config),
        encoding=_attention_encoding(vllm_config, dtype, cache_config.block_size, head_size),
    )
    model_identity = f"{model_config.model}@{model_config.revision or ''}"
    return KeySpace(tenant=tenant, model=model_identity, layout=layout, rank=rank)
