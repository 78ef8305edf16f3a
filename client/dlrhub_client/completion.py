"""Shell completion for `dlrhub`, written from its argparse parser, so it never falls behind it.

    dlrhub completion bash > ~/.local/share/bash-completion/completions/dlrhub
    eval "$(dlrhub completion zsh)"          (in ~/.zshrc)

The script completes the commands, each command's flags (the connection flags anywhere), the values
of a flag or argument with choices, and file names where a path is expected. It is static: a Tab
runs no Python. zsh runs the bash function through its bashcompinit.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

SHELLS = ("bash", "zsh")

_BASH = """\
# bash completion for dlrhub: `dlrhub completion bash`
_dlrhub() {{
    local cur=${{COMP_WORDS[COMP_CWORD]}} prev=${{COMP_WORDS[COMP_CWORD-1]}} command="" i
    for ((i = 1; i < COMP_CWORD; i++)); do
        case ${{COMP_WORDS[i]}} in
            {commands}) command=${{COMP_WORDS[i]}}; break ;;
        esac
    done
    COMPREPLY=()
    case $command:$prev in
{values}
    esac
    case $command in
{words}
    esac
}}
_dlrhub_files() {{
    compopt -o filenames 2>/dev/null  # bash: quote and mark them as file names
    COMPREPLY+=($(compgen -f -- "$1"))
}}
complete -F _dlrhub dlrhub
"""

_ZSH = """\
# zsh completion for dlrhub: `eval "$(dlrhub completion zsh)"`, through zsh's bash completion layer
(( $+functions[compdef] )) || {{ autoload -U +X compinit && compinit }}
autoload -U +X bashcompinit && bashcompinit
{bash}"""


def script(parser: argparse.ArgumentParser, shell: str) -> str:
    """The completion script of `parser` (a parser with sub-commands) for `shell`."""
    commands = _commands(parser)
    values: list[str] = []
    words: list[str] = []
    everywhere = {option for action in parser._actions for option in action.option_strings}
    for name, command in [("", parser), *commands.items()]:
        for action in command._actions:
            if action.option_strings and action.nargs != 0:
                if name and everywhere.issuperset(action.option_strings):
                    continue  # a connection flag: its value is offered for any command
                patterns = "|".join(f"{name or '*'}:{option}" for option in action.option_strings)
                values.append(f"        {patterns}) {_offer(action)}; return ;;")
        flags = [option for action in command._actions for option in action.option_strings]
        offered = [*commands, *flags] if not name else flags
        line = f'COMPREPLY=($(compgen -W {shlex.quote(" ".join(offered))} -- "$cur"))'
        positionals = [action for action in command._actions if not action.option_strings]
        if name and positionals:
            line += f"; [[ $cur == -* ]] || {{ {_offer(positionals[0], append=True)}; }}"
        pattern = name or '""'
        words.append(f"        {pattern}) {line} ;;")
    bash = _BASH.format(commands="|".join(commands), values="\n".join(values), words="\n".join(words))
    if shell == "bash":
        return bash
    if shell == "zsh":
        return _ZSH.format(bash=bash)
    raise ValueError(f"no completion for {shell!r}: one of {', '.join(SHELLS)}")


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _offer(action: argparse.Action, *, append: bool = False) -> str:
    """The bash that offers the values of `action`: its choices (or the `names` of its type), file
    names, or nothing."""
    choices = action.choices if action.choices is not None else getattr(action.type, "names", None)
    if choices is not None:
        words = shlex.quote(" ".join(map(str, choices)))
        return f'COMPREPLY{"+" if append else ""}=($(compgen -W {words} -- "$cur"))'
    if action.type is Path:
        return '_dlrhub_files "$cur"'
    return ":"
