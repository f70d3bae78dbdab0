"""Short-lived TURN credentials (server/turn.py), the TURN REST API scheme of coturn's
`use-auth-secret`, and the `[turn]` section that configures them. The password is checked
against an HMAC computed apart (the `cryptography` package and the `openssl` command line, not
the standard library's hmac that server/turn.py uses); coturn itself accepting and refusing
them is tests/lab/test_turn_aiortc.py's."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, hmac

from server.config import ConfigError, TurnConfig, load_config
from server.turn import TurnCredentials, ice_servers_for_clients

SECRET = "shared-with-coturn-0123456789"
URLS = [
    "turn:turn.example.org:3478?transport=udp",
    "turn:turn.example.org:3478?transport=tcp",
    "turns:turn.example.org:443?transport=tcp",
]
NOW = 1_796_000_000.75


def turn(**fields: object) -> TurnConfig:
    return TurnConfig.model_validate({"secret": SECRET, "urls": URLS, **fields})


def hmac_sha1_base64(key: str, message: str) -> str:
    mac = hmac.HMAC(key.encode(), hashes.SHA1())
    mac.update(message.encode())
    return base64.b64encode(mac.finalize()).decode()


def test_a_credential_is_expiry_colon_user_and_the_hmac_of_it() -> None:
    minted = TurnCredentials(turn(ttl_s=3600), clock=lambda: NOW).mint("p_0123456789ab")

    assert minted["urls"] == URLS
    assert minted["username"] == f"{int(NOW) + 3600}:p_0123456789ab"
    assert minted["credential"] == hmac_sha1_base64(SECRET, minted["username"])
    assert set(minted) == {"urls", "username", "credential"}


def test_the_password_matches_openssl() -> None:
    minted = TurnCredentials(turn(), clock=lambda: NOW).mint("p_aa51d6edf863")
    digest = subprocess.run(
        ["openssl", "dgst", "-sha1", "-hmac", SECRET, "-binary"],
        input=minted["username"].encode(),
        capture_output=True,
        check=True,
    ).stdout
    assert minted["credential"] == base64.b64encode(digest).decode()


def test_each_mint_counts_from_its_own_moment_and_user() -> None:
    now = [NOW]
    credentials = TurnCredentials(turn(ttl_s=600), clock=lambda: now[0])
    first = credentials.mint("p_1")
    now[0] += 90
    later = credentials.mint("p_1")
    other = credentials.mint("p_2")

    assert first["username"] == f"{int(NOW) + 600}:p_1"
    assert later["username"] == f"{int(NOW) + 690}:p_1"
    assert len({first["credential"], later["credential"], other["credential"]}) == 3


def test_another_secret_gives_another_password() -> None:
    mine = TurnCredentials(turn(), clock=lambda: NOW).mint("p_1")
    theirs = TurnCredentials(turn(secret="another-secret-0123456789"), clock=lambda: NOW).mint(
        "p_1"
    )
    assert mine["username"] == theirs["username"]
    assert mine["credential"] != theirs["credential"]


def test_the_default_lifetime_is_hours_not_days() -> None:
    ttl = TurnConfig().ttl_s
    assert 3600 <= ttl <= 12 * 3600


@pytest.mark.parametrize("user", ["", "p_1:admin"])
def test_a_user_that_would_make_the_username_ambiguous_is_refused(user: str) -> None:
    with pytest.raises(ValueError, match="hold no ':'"):
        TurnCredentials(turn()).mint(user)


def test_clients_get_the_static_servers_then_their_own_turn_server() -> None:
    static = [{"urls": ["stun:stun.example.org:3478"]}]
    for_participant = ice_servers_for_clients(static, TurnCredentials(turn(), clock=lambda: NOW))

    servers = for_participant("p_1")
    assert servers[0] == static[0]
    assert servers[1]["username"].endswith(":p_1")
    assert ice_servers_for_clients(static, None)("p_1") == static


def test_turn_is_configured_from_the_environment(tmp_path: Path) -> None:
    config = load_config(
        env={
            "TELEMED_TURN_SECRET": SECRET,
            "TELEMED_TURN_URLS": f"{URLS[0]}, {URLS[1]} {URLS[2]}",
            "TELEMED_TURN_TTL_S": "7200",
        }
    )
    assert config.turn.urls == URLS
    assert config.turn.ttl_s == 7200
    assert config.turn.secret is not None
    assert config.turn.secret.get_secret_value() == SECRET
    # Never shown: not in the config's repr, not in a dump.
    assert SECRET not in repr(config)
    assert SECRET not in str(config.model_dump())


def test_turn_is_configured_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "telemed.toml"
    path.write_text(
        f'[turn]\nsecret = "{SECRET}"\nurls = {URLS!r}\nttl_s = 900\n'.replace("'", '"')
    )
    config = load_config(path, env={})
    assert (config.turn.urls, config.turn.ttl_s, config.turn.enabled) == (URLS, 900, True)


def test_no_turn_unless_configured() -> None:
    assert not load_config(env={}).turn.enabled


@pytest.mark.parametrize(
    ("turn_section", "message"),
    [
        ({"urls": URLS}, "turn.secret is required with turn.urls"),
        ({"secret": SECRET}, "turn.urls is required with turn.secret"),
        ({"secret": "short", "urls": URLS}, "turn.secret must be at least 16 characters"),
        ({"secret": SECRET, "urls": ["stun:turn.example.org:3478"]}, "is not a TURN URL"),
        ({"secret": SECRET, "urls": ["https://turn.example.org"]}, "is not a TURN URL"),
        ({"secret": SECRET, "urls": ["turn:turn.example.org:3478?transport=sctp"]}, "TURN URL"),
        ({"secret": SECRET, "urls": ["turn:turn example.org"]}, "is not a TURN URL"),
        (
            {"secret": SECRET, "urls": ["turns:turn.example.org:443?transport=udp"]},
            "turns: runs over TLS, which needs transport=tcp",
        ),
        ({"secret": SECRET, "urls": ["turn:turn.example.org:70000"]}, "within 1..65535"),
        ({"secret": SECRET, "urls": ["turn:turn.example.org:0"]}, "within 1..65535"),
        ({"secret": SECRET, "urls": URLS, "ttl_s": 10}, "turn.ttl_s"),
        ({"secret": SECRET, "urls": URLS, "ttl_s": 30 * 86400}, "turn.ttl_s"),
        ({"secret": SECRET, "urls": URLS, "password": "x"}, "turn.password"),
    ],
)
def test_bad_turn_configuration_is_refused_by_name(
    turn_section: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match="invalid configuration") as caught:
        load_config(env={}, overrides={"turn": turn_section})

    assert message in str(caught.value)
    # The refusal never repeats the secret (a short one included).
    assert SECRET not in str(caught.value)
    assert "short" not in str(caught.value).replace("shorter", "")
