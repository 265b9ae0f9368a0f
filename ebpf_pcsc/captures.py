"""What a probe captures through a function's arguments (see functions.py),
and the Function row itself."""
from dataclasses import dataclass
from typing import Callable, Optional, Tuple, Union


@dataclass(frozen=True)
class Word:
    name: str
    arg: str
    offset: int = 0


@dataclass(frozen=True)
class Text:
    name: str
    arg: str


@dataclass(frozen=True)
class Bytes:
    name: str
    arg: str
    length: str                      # a Word of this phase, else an argument
    autoalloc: Optional[str] = None  # an entry Word
    on_success: bool = False


@dataclass(frozen=True)
class ReaderStates:
    name: str
    arg: str
    count: str                       # an argument


Capture = Union[Word, Text, Bytes, ReaderStates]


@dataclass(frozen=True)
class Function:
    name: str
    args: Tuple[str, ...]
    render: Callable
    entry: Tuple[Capture, ...] = ()
    exit: Tuple[Capture, ...] = ()

    def arg_index(self, name: str) -> int:
        return self.args.index(name)

    @property
    def captures(self) -> Tuple[Capture, ...]:
        """Entry then exit captures: a buffer's field is an index here."""
        return self.entry + self.exit

    def words(self, phase: Tuple[Capture, ...]) -> Tuple[Word, ...]:
        return tuple(c for c in phase if isinstance(c, Word))
