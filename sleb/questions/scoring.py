"""Whether a reply answers a question: harder to pass than the thing it measures.

A reply is right when one accepted answer stands in it as the answer:
- whole tokens only: "Parisian" is not "Paris", and a number is one token with its decimals, times and digit
  groups, so "2.5" is not 5, "12:00" is not 12 and "1,2" is not 12 ("1,000" is 1000);
- a number that is a piece of a longer one ("twenty-four" for 4) or an item of a list of numbers
  ("1, 2, 3, 4, 5" for 5) is no answer;
- a copy of the question is no answer: an occurrence that continues a run copied from the question by two or
  more tokens ("exactly: apple" for "Repeat this word exactly: apple", "red, green" for the first of "red,
  green, blue") does not count;
- a letter or a common word ("A", "no", "one", "right") counts only where it stands alone: before the end of a
  sentence or the reply, or in quotes, or after "letter" (a letter also before "is"); never as the article
  in "a dog" or the "no" of "there is no";
- case counts where the question asks for it (item["case"]: "CAT" for capital letters, not "cat"); elsewhere
  it is folded, and so are accents ("Bogota" for "Bogotá").
"""

import hashlib
import json
import re
import unicodedata

from sleb.questions.question_set import items

# A number with its decimals, times and digit groups as one token; then words; then any other character.
_TOKEN = re.compile(r"[0-9]+(?:[.,:/][0-9]+)*(?![0-9A-Za-z])|[0-9A-Za-z]+|[^\s0-9A-Za-z]")
_THOUSANDS = re.compile(r"[0-9]{1,3}(?:,[0-9]{3})+")
_NUMBER_WORDS = frozenset(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred thousand "
    "million".split())
# Answers that are also everyday words: credited only where they stand alone.
_COMMON = frozenset("a no one right last end down light new easy short close".split())
_ALONE_AFTER = frozenset(list(".!?;)*`\"'") + ["\u201d", "\u2019"])  # what may follow a word standing alone
_ALONE_BEFORE = frozenset(list("*`\"'") + ["\u201c", "\u2018", "letter"])
_JOINERS = frozenset([",", "-", "and"])  # what joins the parts of a number or the items of a list
MIN_COPY = 2  # tokens of the question an occurrence must extend to count as a copy of it


def tokens(text: str, keep_case: bool = False) -> list:
    """The text's tokens, accents folded (and case too, unless kept); "1,000" reads 1000."""
    folded = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    folded = re.sub(r"(?<=[A-Za-z])-(?=[A-Za-z])", " ", folded)  # "twenty-four" is "twenty four"
    found = [token.replace(",", "") if _THOUSANDS.fullmatch(token) else token for token in _TOKEN.findall(folded)]
    return found if keep_case else [token.lower() for token in found]


def _is_number(token: str) -> bool:
    return token[0].isdigit() or token.lower() in _NUMBER_WORDS


def _copied(said: list, start: int, end: int, asked: list) -> bool:
    """Whether said[start:end] sits in a run copied from the question that reaches MIN_COPY tokens beyond it."""
    size = end - start
    for at in range(len(asked) - size + 1):
        if asked[at:at + size] != said[start:end]:
            continue
        left = 0
        while start - left > 0 and at - left > 0 and said[start - left - 1] == asked[at - left - 1]:
            left += 1
        right = 0
        while end + right < len(said) and at + size + right < len(asked) and said[end + right] == asked[at + size + right]:
            right += 1
        if left + right >= MIN_COPY:
            return True
    return False


def _part_of_larger_number(said: list, start: int, end: int) -> bool:
    """A number whose neighbour, directly or across a joiner ("," "-" "and"), is a number too."""
    for step, edge in ((-1, start - 1), (1, end)):
        neighbour = edge
        if 0 <= neighbour < len(said) and said[neighbour] in _JOINERS:
            neighbour += step
        if 0 <= neighbour < len(said) and _is_number(said[neighbour]):
            return True
    return False


def _alone(said: list, start: int, end: int, letter: bool) -> bool:
    after = said[end] if end < len(said) else None
    before = said[start - 1] if start > 0 else None
    if letter and after in ("is", "was"):  # "A is the first letter": an article is never followed by a verb
        return True
    return after is None or after in _ALONE_AFTER or before in _ALONE_BEFORE


def _counts(said: list, start: int, end: int, answer: list, asked: list) -> bool:
    if _copied(said, start, end, asked):
        return False
    if all(_is_number(token) for token in answer) and _part_of_larger_number(said, start, end):
        return False
    letter = len(answer) == 1 and len(answer[0]) == 1 and answer[0].isalpha()
    if len(answer) == 1 and (letter or answer[0].lower() in _COMMON) and not _alone(said, start, end, letter):
        return False
    return True


def is_right(item: dict, reply: str) -> bool:
    """Whether `reply` answers `item` (a dict from `items()`): see the module's docstring for each rule."""
    keep_case = bool(item.get("case"))
    said = tokens(reply, keep_case)
    asked = tokens(item["question"], keep_case)
    for text in item["answers"]:
        answer = tokens(text, keep_case)
        size = len(answer)
        for start in range(len(said) - size + 1):
            if said[start:start + size] == answer and _counts(said, start, start + size, answer, asked):
                return True
    return False


def digest() -> str:
    """The question set's and this scoring's digest (questions, accepted answers, case rules, the rules
    themselves): results measured under another are not compared with these."""
    with open(__file__, "rb") as handle:
        source = handle.read()
    return hashlib.sha256(json.dumps(items(), sort_keys=True).encode() + source).hexdigest()[:16]
