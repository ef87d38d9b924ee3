"""How the samples a person reads are drawn: at the end of `train` (before and after), in the report, and by
`generate` without flags. Seeded sampling with a repetition penalty: greedy decoding of a small or briefly trained
model repeats one phrase ("北京北京北京…") even when the held-out loss fell, which reads as a broken run. The seed
makes each sample repeat exactly (same prompts, batch and device). The smoke test keeps its own, deterministic,
greedy checks (`job.model.generate.smoke`).

Every default of a generation setting is written here once: `Sampling`'s fields (what `generate` does when asked
for nothing) and `READING_SAMPLES` (the samples people read); the CLI's option defaults, the report and the model
card's usage snippet read them. No torch import: the CLI reads these for its option defaults."""

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Sampling:
    """How `job.model.generate.generate` draws tokens."""

    greedy: bool = True
    top_k: int = 50
    top_p: float = 0.95
    temperature: float = 1.0
    repetition_penalty: float = 1.0  # 1.0: none
    seed: int = 0


READING_SAMPLES = asdict(Sampling(greedy=False, temperature=0.8, repetition_penalty=1.3))


SPOKEN = {"top_k": "top-k", "top_p": "top-p", "repetition_penalty": "repetition penalty"}  # names in a report


def _drawn_by(settings: dict) -> list[str]:
    """The settings that decide a draw, by name: greedy reads only the repetition penalty."""
    return ["repetition_penalty"] if settings["greedy"] else ["temperature", "top_k", "top_p", "repetition_penalty"]


def hf_generate_arguments(settings: dict = READING_SAMPLES) -> str:
    """The same draw as `model.generate(...)` keyword arguments, for a snippet people copy (the model card)."""
    shown = [f"do_sample={not settings['greedy']}", *(f"{name}={settings[name]}" for name in _drawn_by(settings))]
    return ", ".join(shown)


def describe(settings: dict = READING_SAMPLES) -> str:
    """One line for a report: how its samples were drawn."""
    shown = ", ".join(f"{SPOKEN.get(name, name)} {settings[name]}" for name in _drawn_by(settings))
    return f"greedy, {shown}" if settings["greedy"] else f"sampled with seed {settings['seed']}: {shown}"
