"""The Click group, global options and the error convention shared by every command.

Exit codes: 0 ok, 1 runtime failure, 2 bad input (one line on stderr, nothing written).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import click

from budgetlab.version import __version__
from budgetlab.errors import BadInput, RuntimeFailure


@dataclass
class State:
    ledger_path: Path
    workdir: Path

    def lab(self):
        """The budgetlab.Lab every command calls (one per invocation)."""
        if not hasattr(self, "_lab"):
            from budgetlab.api import Lab
            self._lab = Lab(ledger=self.ledger_path, workdir=self.workdir)
        return self._lab


class Group(click.Group):
    """Turns our exceptions into one-line errors and exit codes."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except BadInput as e:
            click.echo(f"budgetlab: error: {e}", err=True)
            ctx.exit(2)
        except RuntimeFailure as e:
            click.echo(f"budgetlab: failed: {e}", err=True)
            ctx.exit(1)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("budgetlab: interrupted", err=True)
            ctx.exit(130)
        except Exception as e:  # a bug or an environment failure: say what, keep the trace
            if os.environ.get("BUDGETLAB_DEBUG"):
                traceback.print_exc()
            click.echo(f"budgetlab: failed: {type(e).__name__}: {e} "
                       f"(set BUDGETLAB_DEBUG=1 for the traceback)", err=True)
            ctx.exit(1)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--ledger", "ledger_path", envvar="BUDGETLAB_LEDGER", default="ledger.db",
              show_default=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The ledger file (env BUDGETLAB_LEDGER).")
@click.option("--workdir", envvar="BUDGETLAB_WORKDIR", default="runs", show_default=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Stage directories and job folders (env BUDGETLAB_WORKDIR).")
@click.version_option(__version__, prog_name="budgetlab")
@click.pass_context
def main(ctx, ledger_path: Path, workdir: Path):
    """Split an annotation budget between SFT and preference data: plan, run, measure."""
    ctx.obj = State(ledger_path=ledger_path, workdir=workdir)


pass_state = click.make_pass_decorator(State)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


def echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=False, default=str))


def console():
    from rich.console import Console
    return Console(soft_wrap=False, width=None if sys.stdout.isatty() else 120)


def load_plan(grid_path: str):
    """Parse + validate a grid spec and build its stage graph (BadInput on bad specs)."""
    from budgetlab.api import load_plan as load
    return load(grid_path)
