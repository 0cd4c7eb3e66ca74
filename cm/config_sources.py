"""Where a setting's value comes from: the environment (``CM_<NAME>``), then the TOML config file
named by ``CM_CONFIG`` (default ``/etc/cm/cm.toml``), then its default.

cm.config builds every setting from here; the commands read just the one they need (where the head
listens) from here too, without cm.config's dataclass and pathlib, which cost a command ~10 ms.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs a command ~10 ms
    from typing import Any, Mapping

CONFIG_FILE = "/etc/cm/cm.toml"
RUN_DIR = "drive/run"  # the default of the run_dir setting


class ConfigError(ValueError):
    """A setting has a value that cannot be used."""


def env_name(setting: str) -> str:
    return "MONGODB_URI" if setting == "mongodb_uri" else f"CM_{setting.upper()}"


def config_file(env: Mapping[str, str]) -> str:
    return env.get("CM_CONFIG", CONFIG_FILE)


def read_config_file(env: Mapping[str, str]) -> dict[str, Any]:
    """The config file's settings; {} when there is no file."""
    path = config_file(env)
    if not os.path.isfile(path):
        return {}
    import tomllib  # only here: most processes have no config file, and every command starts here

    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {path}: {exc}") from None


def coerce(name: str, kind: type, raw: Any) -> Any:
    if isinstance(raw, kind) and not (kind is int and isinstance(raw, bool)):
        return raw
    text = str(raw).strip()
    try:
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(text)
        return kind(text)
    except ValueError:
        raise ConfigError(f"setting {name}: {raw!r} is not a valid {kind.__name__}") from None


UNSET = object()


def raw_value(name: str, env: Mapping[str, str], from_file: Mapping[str, Any], overrides: Mapping[str, Any] = {}) -> Any:
    """The setting as given (an override, the environment, the file), or UNSET for its default."""
    if name in overrides:
        return overrides[name]
    if env_name(name) in env:
        return env[env_name(name)]
    return from_file.get(name, UNSET)


def head_socket(socket: str, run_dir: str) -> str:
    """The Unix socket the head serves commands on: the socket setting, or RUN_DIR/head.sock."""
    return socket or os.path.join(run_dir, "head.sock")


def find_head_socket(env: Mapping[str, str] | None = None) -> str:
    """head_socket() from the socket and run_dir settings alone (what a command needs)."""
    env = os.environ if env is None else env
    from_file = read_config_file(env)
    values = {}
    for name, default in (("socket", ""), ("run_dir", RUN_DIR)):
        raw = raw_value(name, env, from_file)
        values[name] = default if raw is UNSET else coerce(name, str, raw)
    return head_socket(**values)
