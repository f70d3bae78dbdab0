"""Configuration: defaults < TOML file < TELEMED_* environment < overrides, validated in one place.

Every test passes `env` explicitly, so the real environment of the test run never leaks in.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import SecretStr, ValidationError

from server.config import DEV_JWT_SECRET, Config, ConfigError, JwtConfig, load_config

STRONG_SECRET = "strong-secret-0123456789abcdef-0123456789"


def _write(tmp_path: Path, text: str, name: str = "telemed.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _es256_public_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


FULL_TOML = """\
dev = true
host = "0.0.0.0"
port = 9000
data_dir = "/srv/telemed"
public_url = "https://telemed.example.org"
log_format = "json"
log_level = "debug"
max_body_bytes = 1048576

[jwt]
secret = "file-secret-0123456789abcdef-0123456789"
issuer = "county-alliance"
audience = "telemed-api"
leeway_s = 10
access_ttl_s = 3600

[[ice_servers]]
urls = ["stun:stun.example.org:3478"]

[[ice_servers]]
urls = ["turn:turn.example.org:3478?transport=udp", "turns:turn.example.org:5349"]
username = "telemed"
credential = "turn-password-from-file"
"""


# --- defaults ----------------------------------------------------------------------------


def test_defaults_without_file_or_environment() -> None:
    config = load_config(env={})

    assert config.dev is False
    assert config.host == "127.0.0.1"
    assert config.port == 8080
    assert config.data_dir == Path("data")
    assert config.database_url == ""
    assert config.redis_url is None
    assert config.public_url == ""
    assert config.log_format == "text"
    assert config.log_level == "INFO"
    assert config.max_body_bytes == 256 * 1024
    assert config.ice_servers == []
    assert config.jwt.algorithm == "HS256"
    assert config.jwt.secret.get_secret_value() == DEV_JWT_SECRET
    assert config.jwt.public_key is None
    assert config.jwt.private_key is None
    assert config.jwt.issuer == "telemed"
    assert config.jwt.audience == "telemed"
    assert config.jwt.leeway_s == 30
    assert config.jwt.access_ttl_s == 8 * 3600
    assert config.jwt.invite_ttl_s == 2 * 3600
    assert config.effective_public_url == "http://127.0.0.1:8080"


def test_load_config_with_empty_env_equals_plain_model() -> None:
    assert load_config(env={}) == Config()


def test_config_is_frozen() -> None:
    config = load_config(env={})
    with pytest.raises(ValidationError, match="frozen"):
        config.port = 1  # type: ignore[misc]


# --- the TOML file -----------------------------------------------------------------------


def test_toml_file_overlays_defaults_including_nested_sections(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, FULL_TOML), env={})

    assert config.dev is True
    assert config.host == "0.0.0.0"
    assert config.port == 9000
    assert config.data_dir == Path("/srv/telemed")
    assert config.log_format == "json"
    assert config.log_level == "debug"
    assert config.max_body_bytes == 1048576
    assert config.effective_public_url == "https://telemed.example.org"
    # [jwt]: the keys it names replace the defaults, the others keep them.
    assert config.jwt.secret.get_secret_value() == "file-secret-0123456789abcdef-0123456789"
    assert config.jwt.issuer == "county-alliance"
    assert config.jwt.audience == "telemed-api"
    assert config.jwt.leeway_s == 10
    assert config.jwt.access_ttl_s == 3600
    assert config.jwt.invite_ttl_s == 2 * 3600
    assert config.jwt.algorithm == "HS256"
    # [[ice_servers]]: an array of tables, in file order.
    assert [s.urls for s in config.ice_servers] == [
        ["stun:stun.example.org:3478"],
        ["turn:turn.example.org:3478?transport=udp", "turns:turn.example.org:5349"],
    ]
    assert config.ice_servers[0].username is None
    assert config.ice_servers[0].credential is None
    assert config.ice_servers[1].username == "telemed"
    credential = config.ice_servers[1].credential
    assert credential is not None
    assert credential.get_secret_value() == "turn-password-from-file"


def test_config_file_named_by_telemed_config_variable(tmp_path: Path) -> None:
    path = _write(tmp_path, 'port = 9001\n[jwt]\nissuer = "from-env-path"\n')

    config = load_config(env={"TELEMED_CONFIG": str(path)})

    assert config.port == 9001
    assert config.jwt.issuer == "from-env-path"


def test_explicit_path_wins_over_telemed_config_variable(tmp_path: Path) -> None:
    explicit = _write(tmp_path, "port = 9002\n", "explicit.toml")
    named = _write(tmp_path, "port = 9003\n", "named.toml")

    assert load_config(explicit, env={"TELEMED_CONFIG": str(named)}).port == 9002


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"

    with pytest.raises(ConfigError, match="cannot read config file") as caught:
        load_config(missing, env={})

    assert str(missing) in str(caught.value)


def test_missing_file_named_by_variable_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "absent.toml"

    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(env={"TELEMED_CONFIG": str(missing)})


def test_invalid_toml_is_a_config_error(tmp_path: Path) -> None:
    path = _write(tmp_path, "port = = 9000\n[jwt\n")

    with pytest.raises(ConfigError, match="cannot read config file") as caught:
        load_config(path, env={})

    assert str(path) in str(caught.value)


def test_non_utf8_config_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "gbk.toml"
    path.write_bytes('[jwt]\nissuer = "安县医共体"\n'.encode("gbk"))

    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(path, env={})


# --- environment and overrides -----------------------------------------------------------


def test_environment_beats_the_file_field_by_field(tmp_path: Path) -> None:
    path = _write(tmp_path, FULL_TOML)
    env = {
        "TELEMED_PORT": "9100",
        "TELEMED_DEV": "false",
        "TELEMED_LOG_FORMAT": "text",
        "TELEMED_JWT_SECRET": STRONG_SECRET,
        "TELEMED_JWT_LEEWAY_S": "5",
        "TELEMED_REDIS_URL": "redis://cache:6379/0",
    }

    config = load_config(path, env=env)

    assert config.port == 9100
    assert config.dev is False
    assert config.log_format == "text"
    assert config.redis_url == "redis://cache:6379/0"
    assert config.jwt.secret.get_secret_value() == STRONG_SECRET
    assert config.jwt.leeway_s == 5
    # Untouched by the environment: still from the file, even inside the same [jwt] section.
    assert config.host == "0.0.0.0"
    assert config.jwt.issuer == "county-alliance"
    assert config.jwt.access_ttl_s == 3600
    assert len(config.ice_servers) == 2


def test_every_documented_variable_reaches_its_field(tmp_path: Path) -> None:
    env = {
        "TELEMED_DEV": "1",
        "TELEMED_HOST": "10.0.0.5",
        "TELEMED_PORT": "8443",
        "TELEMED_DATA_DIR": str(tmp_path / "data"),
        "TELEMED_DATABASE_URL": "postgresql+asyncpg://telemed@db/telemed",
        "TELEMED_REDIS_URL": "redis://cache:6379/1",
        "TELEMED_PUBLIC_URL": "https://tm.example.org",
        "TELEMED_LOG_FORMAT": "json",
        "TELEMED_LOG_LEVEL": "WARNING",
        "TELEMED_MAX_BODY_BYTES": "4096",
        "TELEMED_JWT_ALGORITHM": "HS256",
        "TELEMED_JWT_SECRET": STRONG_SECRET,
        "TELEMED_JWT_ISSUER": "iss-x",
        "TELEMED_JWT_AUDIENCE": "aud-y",
        "TELEMED_JWT_LEEWAY_S": "0",
        "TELEMED_JWT_ACCESS_TTL_S": "600",
        "TELEMED_JWT_INVITE_TTL_S": "300",
    }

    config = load_config(env=env)

    assert config.dev is True
    assert config.host == "10.0.0.5"
    assert config.port == 8443
    assert config.data_dir == tmp_path / "data"
    assert config.effective_database_url == "postgresql+asyncpg://telemed@db/telemed"
    assert config.redis_url == "redis://cache:6379/1"
    assert config.effective_public_url == "https://tm.example.org"
    assert config.log_format == "json"
    assert config.log_level == "WARNING"
    assert config.max_body_bytes == 4096
    assert config.jwt.secret.get_secret_value() == STRONG_SECRET
    assert config.jwt.issuer == "iss-x"
    assert config.jwt.audience == "aud-y"
    assert config.jwt.leeway_s == 0
    assert config.jwt.access_ttl_s == 600
    assert config.jwt.invite_ttl_s == 300


def test_unrelated_environment_variables_are_ignored() -> None:
    config = load_config(env={"TELEMED_NOT_A_SETTING": "x", "PORT": "1", "telemed_port": "2"})

    assert config == Config()


def test_overrides_beat_environment_and_file(tmp_path: Path) -> None:
    path = _write(tmp_path, FULL_TOML)
    env = {"TELEMED_PORT": "9100", "TELEMED_JWT_ISSUER": "env-issuer"}

    config = load_config(
        path, env=env, overrides={"port": 9200, "dev": False, "jwt.issuer": "override-issuer"}
    )

    assert config.port == 9200
    assert config.dev is False
    assert config.jwt.issuer == "override-issuer"
    # The rest of [jwt] from the file survives a dotted override.
    assert config.jwt.audience == "telemed-api"


# --- invalid values ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "field"),
    [
        ({"TELEMED_PORT": "abc"}, "port"),
        ({"TELEMED_PORT": "70000"}, "port"),
        ({"TELEMED_DEV": "maybe"}, "dev"),
        ({"TELEMED_LOG_FORMAT": "xml"}, "log_format"),
        ({"TELEMED_MAX_BODY_BYTES": "0"}, "max_body_bytes"),
        ({"TELEMED_JWT_ALGORITHM": "HS512"}, "jwt.algorithm"),
        ({"TELEMED_JWT_ALGORITHM": "none"}, "jwt.algorithm"),
        ({"TELEMED_JWT_LEEWAY_S": "301"}, "jwt.leeway_s"),
        ({"TELEMED_JWT_INVITE_TTL_S": "0"}, "jwt.invite_ttl_s"),
        ({"TELEMED_JWT_ALGORITHM": "RS256"}, "jwt.public_key"),
        ({"TELEMED_JWT_ALGORITHM": "ES256"}, "jwt.public_key"),
    ],
)
def test_invalid_environment_value_names_the_field(env: dict[str, str], field: str) -> None:
    with pytest.raises(ConfigError, match="invalid configuration") as caught:
        load_config(env=env)

    assert field in str(caught.value)


@pytest.mark.parametrize(
    ("toml", "field"),
    [
        ("bogus = 1\n", "bogus"),
        ("[jwt]\nsecrett = 'typo'\n", "jwt.secrett"),
        ("[[ice_servers]]\nurls = ['stun:x']\npassword = 'p'\n", "ice_servers.0.password"),
        ("[[ice_servers]]\nusername = 'u'\n", "ice_servers.0.urls"),
        ("port = 'abc'\n", "port"),
        ("[jwt]\nalgorithm = 'RS256'\n", "jwt.public_key"),
    ],
)
def test_invalid_file_value_names_the_field(tmp_path: Path, toml: str, field: str) -> None:
    with pytest.raises(ConfigError, match="invalid configuration") as caught:
        load_config(_write(tmp_path, toml), env={})

    assert field in str(caught.value)


def test_unknown_key_is_reported_as_not_permitted(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Extra inputs are not permitted"):
        load_config(_write(tmp_path, "prot = 8080\n"), env={})


def test_asymmetric_algorithm_with_public_key_is_accepted() -> None:
    pem = _es256_public_pem()

    config = load_config(env={"TELEMED_JWT_ALGORITHM": "ES256", "TELEMED_JWT_PUBLIC_KEY": pem})

    assert config.jwt.algorithm == "ES256"
    assert config.jwt.public_key is not None
    assert config.jwt.public_key.get_secret_value() == pem


def test_config_error_does_not_echo_the_jwt_secret() -> None:
    env = {"TELEMED_JWT_ALGORITHM": "RS256", "TELEMED_JWT_SECRET": STRONG_SECRET}

    with pytest.raises(ConfigError, match=r"jwt\.public_key") as caught:
        load_config(env=env)

    message = str(caught.value)
    leaked = [STRONG_SECRET[i : i + 8] for i in range(len(STRONG_SECRET) - 7)]
    assert [part for part in leaked if part in message] == []


# --- derived values ----------------------------------------------------------------------


def test_database_url_defaults_to_sqlite_under_data_dir(tmp_path: Path) -> None:
    config = load_config(env={"TELEMED_DATA_DIR": str(tmp_path / "d")})

    expected = (tmp_path / "d" / "telemed.db").resolve()
    assert config.effective_database_url == f"sqlite+aiosqlite:///{expected}"
    assert expected.is_absolute()


def test_relative_data_dir_is_resolved_to_an_absolute_sqlite_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    url = load_config(env={}).effective_database_url

    assert url == f"sqlite+aiosqlite:///{(tmp_path / 'data' / 'telemed.db').resolve()}"


def test_explicit_database_url_wins_over_data_dir(tmp_path: Path) -> None:
    config = load_config(
        env={
            "TELEMED_DATA_DIR": str(tmp_path),
            "TELEMED_DATABASE_URL": "postgresql+asyncpg://u:p@db:5432/telemed",
        }
    )

    assert config.effective_database_url == "postgresql+asyncpg://u:p@db:5432/telemed"


def test_public_url_defaults_to_host_and_port() -> None:
    config = load_config(env={"TELEMED_HOST": "0.0.0.0"}, overrides={"port": 8181})

    assert config.effective_public_url == "http://0.0.0.0:8181"


# --- check_safe_to_serve -----------------------------------------------------------------

# Only its presence is checked here; reading it is server/signing.py's (tests/test_cli.py).
SIGNING = {"TELEMED_SIGNING_KEY_FILE": "/keys/signing.pem"}


def test_default_secret_is_refused_outside_dev_mode() -> None:
    config = load_config(env={})

    with pytest.raises(ConfigError, match="TELEMED_JWT_SECRET") as caught:
        config.check_safe_to_serve()

    assert "--dev" in str(caught.value)
    assert DEV_JWT_SECRET not in str(caught.value)


@pytest.mark.parametrize("secret", ["short", "x" * 31])
def test_short_secret_is_refused_outside_dev_mode(secret: str) -> None:
    config = load_config(env={"TELEMED_JWT_SECRET": secret})

    with pytest.raises(ConfigError, match="at least 32 characters") as caught:
        config.check_safe_to_serve()

    assert secret not in str(caught.value)


@pytest.mark.parametrize("secret", ["y" * 32, STRONG_SECRET])
def test_secret_of_32_or_more_characters_is_accepted(secret: str) -> None:
    config = load_config(env={"TELEMED_JWT_SECRET": secret, **SIGNING})

    config.check_safe_to_serve()  # does not raise
    assert config.dev is False


@pytest.mark.parametrize("secret", [None, "short"])
def test_dev_mode_accepts_any_secret(secret: str | None) -> None:
    env = {"TELEMED_DEV": "true"}
    if secret is not None:
        env["TELEMED_JWT_SECRET"] = secret

    config = load_config(env=env)

    assert config.dev is True
    config.check_safe_to_serve()  # does not raise


def test_asymmetric_algorithm_does_not_need_the_hmac_secret() -> None:
    config = load_config(
        env={
            "TELEMED_JWT_ALGORITHM": "ES256",
            "TELEMED_JWT_PUBLIC_KEY": _es256_public_pem(),
            **SIGNING,
        }
    )

    assert config.jwt.secret.get_secret_value() == DEV_JWT_SECRET
    config.check_safe_to_serve()  # does not raise


def test_a_signing_key_file_is_required_outside_dev_mode() -> None:
    config = load_config(env={"TELEMED_JWT_SECRET": STRONG_SECRET})
    with pytest.raises(ConfigError, match=r"set TELEMED_SIGNING_KEY_FILE .* or run with --dev"):
        config.check_safe_to_serve()
    rotated = load_config(
        env={**SIGNING, "TELEMED_SIGNING_PREVIOUS_PUBLIC_KEYS": "/keys/2025.pem, /keys/2026.pem"}
    )
    assert rotated.signing.key_file == Path("/keys/signing.pem")
    assert rotated.signing.previous_public_keys == [Path("/keys/2025.pem"), Path("/keys/2026.pem")]


# --- secrets stay secret -----------------------------------------------------------------


def test_secrets_are_masked_in_repr_and_json(tmp_path: Path) -> None:
    config = load_config(
        _write(tmp_path, FULL_TOML),
        env={"TELEMED_JWT_PRIVATE_KEY": "private-key-material-not-for-logs"},
    )
    plain_texts = [
        "file-secret-0123456789abcdef-0123456789",
        "turn-password-from-file",
        "private-key-material-not-for-logs",
    ]

    renderings = {
        "repr": repr(config),
        "str": str(config),
        "json": config.model_dump_json(),
        "jwt repr": repr(config.jwt),
    }

    for where, text in renderings.items():
        for secret in plain_texts:
            assert secret not in text, f"{secret!r} visible in {where}"
    assert "**********" in renderings["json"]
    assert isinstance(config.jwt.secret, SecretStr)
    private_key = config.jwt.private_key
    assert private_key is not None
    assert private_key.get_secret_value() == "private-key-material-not-for-logs"


def test_default_secret_is_masked_too() -> None:
    config = Config(jwt=JwtConfig())

    assert DEV_JWT_SECRET not in repr(config)
    assert DEV_JWT_SECRET not in config.model_dump_json()


def test_the_relay_host_addresses_come_from_the_environment_as_a_list() -> None:
    config = load_config(env={"TELEMED_MEDIA_HOST_ADDRESSES": "172.28.0.10, 10.0.0.5"})
    assert config.media.host_addresses == ["172.28.0.10", "10.0.0.5"]
    assert load_config(env={}).media.host_addresses is None
