"""The settings: each written once, as a field of a config group, with the docs in step."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from gateway.config import OPTIONS, Config, Option

CONFIGURATION = Path(__file__).parent.parent / "docs" / "configuration.md"


def _options_table() -> list[list[str]]:
    """The cells of each option's row in the table under ``## Options``."""
    section = CONFIGURATION.read_text().split("\n## Options\n", 1)[1].split("\n## ", 1)[0]
    table = section.split("\n\n| Flag |", 1)[1].split("\n\n", 1)[0]
    return [
        [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        for line in table.splitlines()
        if line.startswith("| `--")
    ]


def _takes_none(option: Option) -> bool:
    try:
        return option.parse("none") in (None, ())
    except ValueError:
        return False


def test_every_field_is_one_option() -> None:
    """Every field of every group is one option, in the groups' and fields' order, under a name
    that no other option has."""
    config = Config()
    fields = [
        (group.name, f.name)
        for group in dataclasses.fields(config)
        for f in dataclasses.fields(getattr(config, group.name))
    ]
    assert [(o.group, o.name) for o in OPTIONS] == fields
    assert len({o.name for o in OPTIONS}) == len(OPTIONS)


def test_option_reads_its_field() -> None:
    """An option's default, help, parser and secrecy are those its field declares."""
    config = Config()
    for option in OPTIONS:
        group = getattr(config, option.group)
        (f,) = [f for f in dataclasses.fields(group) if f.name == option.name]
        assert option.default() == getattr(group, option.name) == f.default
        assert option.help == f.metadata["help"]
        assert option.parse is f.metadata["parse"]
        assert option.secret is f.metadata["secret"]
        assert f.repr is not option.secret


def test_secrets_stay_out_of_repr() -> None:
    """A config's repr never shows a secret's value."""
    config = Config.from_env({"HANGON_TWILIO_AUTH_TOKEN": "twilio-token-value"})
    assert "twilio-token-value" not in repr(config)
    assert {o.name for o in OPTIONS if o.secret} == {
        "twilio_auth_token",
        "state_keys",
        "caller_hash_key",
        "auth_keys",
    }


def test_docs_table_follows_options() -> None:
    """docs/configuration.md lists every option in --help order, with its variable and default,
    and says `none` in "Accepts" exactly where the option takes it."""
    rows = _options_table()
    assert [row[0] for row in rows] == [f"`{o.flag}`" for o in OPTIONS]
    for option, (_, env, default, accepts, *_) in zip(OPTIONS, rows, strict=True):
        assert (env, default) == (f"`{option.env}`", f"`{option.default_text()}`"), option.flag
        assert ("`none`" in accepts) == _takes_none(option), option.flag
