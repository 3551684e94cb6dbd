"""Configuration: YAML with ``${VAR}`` interpolation and ``.env``, validated into frozen
settings (secrets redacted). The only place that reads environment variables and files."""

from .checks import MISSING_KEY, config_warnings, startup_problems
from .loading import default_config_path, load_settings, parse_settings
from .providers import (
    Authorization,
    ClientCredentialsProvider,
    Credential,
    Defaults,
    Delegation,
    JwtDelegation,
    LoginProvider,
    LoginRequest,
    Provider,
    RefreshTokenProvider,
    Rotation,
    UpstreamDelegation,
)
from .sections import (
    ConsumerSettings,
    JobSchedule,
    JobsSettings,
    ProxyRoute,
    ProxySettings,
    Redirect,
    ServerSettings,
    Settings,
    TelemetrySettings,
)

__all__ = [
    "MISSING_KEY",
    "Authorization",
    "ClientCredentialsProvider",
    "ConsumerSettings",
    "Credential",
    "Defaults",
    "Delegation",
    "JobSchedule",
    "JobsSettings",
    "JwtDelegation",
    "LoginProvider",
    "LoginRequest",
    "Provider",
    "ProxyRoute",
    "ProxySettings",
    "Redirect",
    "RefreshTokenProvider",
    "Rotation",
    "ServerSettings",
    "Settings",
    "TelemetrySettings",
    "UpstreamDelegation",
    "config_warnings",
    "default_config_path",
    "load_settings",
    "parse_settings",
    "startup_problems",
]
