"""Config fields that are also `anee-fast` options: each carries its option's help, once."""
from dataclasses import field


def option(default, help: str):
    """A dataclass field defaulting to `default` whose command-line option shows `help`
    (cli._add_config_options; any default other than None or () is appended there)."""
    return field(default=default, metadata={"help": help})
