"""Loading: configs/pipeline.yaml, then a profile overlay, then `--set key=value` overrides, validated as a whole.
Errors name the file (or the --set flag), the key path, the bad value, what is allowed and the closest valid key."""
from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import BaseModel, ValidationError

from workspace.config.base import _unwrap
from workspace.config.pipeline import PipelineConfig
from workspace.paths import CONFIGS, PROFILES, ROOT


class ConfigError(ValueError):
    """A configuration problem; str() is a message a person can act on."""


@dataclass(frozen=True)
class LoadedConfig:
    config: PipelineConfig
    profile: Optional[str]
    sources: tuple[str, ...]  # the files and --set flags that made it, in order
    origins: dict[str, str] = field(default_factory=dict, repr=False)  # key path -> file or flag

    @property
    def hash(self) -> str:
        return config_hash(self.config)

    def origin(self, key: str) -> str:
        """The file or --set flag that set `key` (or the nearest section above it that was set whole), for error
        messages; the schema default when none did."""
        return _origin_of(key, self.origins, "the built-in default (workspace/config/)")

    def with_values(self, source: str, values: dict[str, Any]) -> "LoadedConfig":
        """This config with typed `values` ({"finetune.stage": "dpo", ...}) laid over it as one more source named
        `source` (a flow's own settings for its run): validated again as a whole, so a rule across sections still
        holds, and each key's origin names `source`. No round trip through `--set` text (which would have to format
        floats and lists back into YAML)."""
        origins = dict(self.origins)
        raw = self.config.model_dump(mode="python")
        for key, value in values.items():
            raw = _merge(raw, _nested(key.split("."), value), source, origins)
        try:
            cfg = PipelineConfig.model_validate(raw)
        except ValidationError as exc:
            lines = [_describe(e, origins, source) for e in exc.errors()]
            raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None
        return LoadedConfig(config=cfg, profile=self.profile, sources=self.sources + (source,), origins=origins)


def config_hash(cfg: PipelineConfig) -> str:
    canonical = json.dumps(cfg.model_dump(mode="json"), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def _merge(base: dict, over: dict, origin: str, origins: dict[str, str], prefix: str = "") -> dict:
    out = dict(base)
    for key, value in over.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, origin, origins, path + ".")
        else:
            out[key] = value
            _mark(value, path, origin, origins)
    return out


def _mark(value: Any, path: str, origin: str, origins: dict[str, str]) -> None:
    origins[path] = origin
    if isinstance(value, dict):
        for k, v in value.items():
            _mark(v, f"{path}.{k}", origin, origins)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`finetune.lora_rank=16` -> (["finetune", "lora_rank"], 16). Values are read as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. --set finetune.lora_rank=16")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not all(parts):
        raise ConfigError(f"--set {text!r}: empty key segment in {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def _nested(parts: list[str], value: Any) -> dict:
    out: Any = value
    for part in reversed(parts):
        out = {part: out}
    return out


def _model_at(path: tuple) -> type[BaseModel] | None:
    """The pydantic model class that owns the key at `path` (a loc tuple), for suggestions."""
    model: Any = PipelineConfig
    for part in path:
        if isinstance(part, int):
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        model = _unwrap(model.model_fields[part].annotation)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _origin_of(path: str, origins: dict[str, str], default: str) -> str:
    probe = path
    while probe:
        if probe in origins:
            return origins[probe]
        probe = probe.rsplit(".", 1)[0] if "." in probe else ""
    return default


def _describe(err: dict, origins: dict[str, str], default_file: str) -> str:
    loc = tuple(err["loc"])
    path = ".".join(str(p) for p in loc) or "(top level)"
    where = _origin_of(path, origins, default_file)
    value = err.get("input")
    shown = json.dumps(value, ensure_ascii=False, default=str) if not isinstance(value, dict) else "{...}"
    if err["type"] == "extra_forbidden":
        owner = _model_at(loc[:-1])
        allowed = sorted(owner.model_fields) if owner else []
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.5)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        section = ".".join(str(p) for p in loc[:-1]) or "the top level"
        return (f"{where}: unknown key '{path}' (value {shown}).{hint} "
                f"Allowed keys in {section}: {', '.join(allowed)}")
    if err["type"] == "value_error":
        # a rule across keys: name every file/flag that set a key of this section
        within = [o for k, o in origins.items() if path == "(top level)" or k == path or k.startswith(path + ".")]
        where = ", ".join(dict.fromkeys(within)) or where
        msg = err["msg"].removeprefix("Value error, ")
        return f"{where}: {path}: {msg}"
    return f"{where}: {path} = {shown}: {err['msg']}"


def load_config(
    path: str | Path | None = None,
    profile: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> LoadedConfig:
    """configs/pipeline.yaml, then configs/profiles/<profile>.yaml over it, then each --set over that.

    The profile is the `profile:` key of the file unless `profile` is given. Raises ConfigError.
    """
    path = Path(path) if path else CONFIGS / "pipeline.yaml"
    if not path.is_absolute() and not path.exists():
        path = ROOT / path
    origins: dict[str, str] = {}
    display = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
    raw = _merge({}, _read_yaml(path), display, origins)
    sources = [display]

    profile = profile or raw.get("profile")
    if profile:
        ppath = PROFILES / f"{profile}.yaml"
        if not ppath.exists():
            known = sorted(p.stem for p in PROFILES.glob("*.yaml"))
            close = difflib.get_close_matches(str(profile), known, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"profile '{profile}': no file {ppath.relative_to(ROOT)}.{hint} Known profiles: {', '.join(known)}")
        pdisplay = str(ppath.relative_to(ROOT))
        overlay = _read_yaml(ppath)
        if "profile" in overlay:
            raise ConfigError(f"{pdisplay}: a profile cannot set 'profile' itself")
        raw = _merge(raw, overlay, pdisplay, origins)
        raw["profile"] = profile
        sources.append(pdisplay)

    for text in overrides:
        parts, value = parse_override(text)
        raw = _merge(raw, _nested(parts, value), f"--set {text}", origins)
        sources.append(f"--set {text}")

    try:
        cfg = PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(e, origins, display) for e in exc.errors()]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None
    return LoadedConfig(config=cfg, profile=profile, sources=tuple(sources), origins=origins)


def add_cli_args(parser) -> None:
    """The same three options on every entry point: --config, --profile, --set (repeatable)."""
    parser.add_argument("--config", default=None, help="pipeline YAML (default configs/pipeline.yaml)")
    parser.add_argument("--profile", default=None, help="overlay from configs/profiles/<name>.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one key, e.g. --set finetune.lora_rank=16 (repeatable)")


def load_from_args(args) -> LoadedConfig:
    return load_config(args.config, args.profile, args.overrides)
