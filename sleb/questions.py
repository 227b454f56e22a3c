"""Short questions with accepted answers, written for this project: what a chat model's user asks and can
check at a glance (facts, arithmetic, units, opposites, sayings, simple instructions).

Each item is {"id", "kind", "question", "answers"}; a reply is right when one accepted answer appears in it
as a whole word, case and punctuation aside (`is_right`). The set is built from the tables below,
deterministically; `items()` returns it in a fixed order.
"""

import re

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "Russia": "Moscow", "Egypt": "Cairo", "Greece": "Athens",
    "Ireland": "Dublin", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen",
    "Austria": "Vienna", "Poland": "Warsaw", "Hungary": "Budapest", "Belgium": "Brussels",
    "the Netherlands": "Amsterdam", "the United Kingdom": "London", "Canada": "Ottawa", "Mexico": "Mexico City",
    "Argentina": "Buenos Aires", "Peru": "Lima", "Chile": "Santiago", "Colombia": "Bogota", "Cuba": "Havana",
    "Kenya": "Nairobi", "Thailand": "Bangkok", "South Korea": "Seoul", "India": "New Delhi", "Iran": "Tehran",
    "Turkey": "Ankara", "Australia": "Canberra", "New Zealand": "Wellington", "the United States": "Washington",
    "Switzerland": "Bern", "Czechia": "Prague", "Ukraine": "Kyiv", "Vietnam": "Hanoi", "Indonesia": "Jakarta",
    "the Philippines": "Manila", "Pakistan": "Islamabad", "Nigeria": "Abuja", "Ethiopia": "Addis Ababa",
    "Morocco": "Rabat", "Iceland": "Reykjavik", "Romania": "Bucharest", "Venezuela": "Caracas",
}
PLURALS = {"mouse": "mice", "child": "children", "foot": "feet", "tooth": "teeth", "man": "men", "woman": "women",
           "goose": "geese", "person": "people", "leaf": "leaves", "knife": "knives"}
PAST_TENSES = {"go": "went", "eat": "ate", "see": "saw", "run": "ran", "write": "wrote", "swim": "swam",
               "buy": "bought", "take": "took", "sing": "sang", "drink": "drank"}
OPPOSITES = {
    "hot": "cold", "big": "small", "up": "down", "day": "night", "fast": "slow", "happy": "sad", "open": "closed",
    "light": "dark", "old": "young", "tall": "short", "full": "empty", "wet": "dry", "early": "late",
    "hard": "soft", "rich": "poor", "strong": "weak", "thick": "thin", "heavy": "light", "inside": "outside",
    "win": "lose", "push": "pull", "buy": "sell", "true": "false", "love": "hate", "north": "south",
    "east": "west", "left": "right", "first": "last", "begin": "end", "yes": "no",
}
FACTS = [
    ("What color is the sky on a clear day?", ["blue"]),
    ("What color is grass?", ["green"]),
    ("What color is snow?", ["white"]),
    ("What color are ripe bananas?", ["yellow"]),
    ("How many legs does a spider have?", ["eight", "8"]),
    ("How many legs does a dog have?", ["four", "4"]),
    ("How many legs does a bird have?", ["two", "2"]),
    ("How many days are in a week?", ["seven", "7"]),
    ("How many months are in a year?", ["twelve", "12"]),
    ("How many hours are in a day?", ["24", "twenty-four", "twenty four"]),
    ("How many minutes are in an hour?", ["60", "sixty"]),
    ("How many seconds are in a minute?", ["60", "sixty"]),
    ("How many sides does a triangle have?", ["three", "3"]),
    ("How many sides does a square have?", ["four", "4"]),
    ("How many sides does a hexagon have?", ["six", "6"]),
    ("How many continents are there?", ["seven", "7"]),
    ("What is the largest planet in our solar system?", ["Jupiter"]),
    ("Which planet is known as the Red Planet?", ["Mars"]),
    ("What planet do we live on?", ["Earth"]),
    ("What is the closest star to Earth?", ["Sun"]),
    ("What do bees make?", ["honey"]),
    ("What animal says moo?", ["cow"]),
    ("What animal barks?", ["dog"]),
    ("What animal is known as the king of the jungle?", ["lion"]),
    ("What is the largest ocean on Earth?", ["Pacific"]),
    ("What is frozen water called?", ["ice"]),
    ("What gas do plants take in from the air?", ["carbon dioxide", "CO2"]),
    ("What gas do humans need to breathe?", ["oxygen"]),
    ("At what temperature in Celsius does water freeze?", ["0", "zero"]),
    ("At what temperature in Celsius does water boil?", ["100"]),
    ("Who wrote Romeo and Juliet?", ["Shakespeare"]),
    ("Who painted the Mona Lisa?", ["Leonardo", "da Vinci"]),
    ("What is the tallest mountain in the world?", ["Everest"]),
    ("What is the longest river in Africa?", ["Nile"]),
    ("What language is spoken in Brazil?", ["Portuguese"]),
    ("What language is spoken in Mexico?", ["Spanish"]),
    ("What is the chemical symbol for water?", ["H2O"]),
    ("What is the chemical symbol for gold?", ["Au"]),
    ("What is the opposite of north on a compass?", ["south"]),
    ("Which season comes after winter?", ["spring"]),
    ("Which season comes after summer?", ["autumn", "fall"]),
    ("What is the first letter of the English alphabet?", ["A"]),
    ("What is the last letter of the English alphabet?", ["Z"]),
    ("How many letters are in the English alphabet?", ["26", "twenty-six"]),
    ("What do you call a baby cat?", ["kitten"]),
    ("What do you call a baby dog?", ["puppy"]),
    ("What is the main ingredient of bread?", ["flour", "wheat"]),
    ("What fruit is used to make wine?", ["grape", "grapes"]),
    ("What instrument has black and white keys?", ["piano"]),
    ("What is the hardest natural substance?", ["diamond"]),
]
UNITS = [
    ("How many centimeters are in a meter?", ["100"]),
    ("How many meters are in a kilometer?", ["1000", "1,000", "thousand"]),
    ("How many grams are in a kilogram?", ["1000", "1,000", "thousand"]),
    ("How many milliliters are in a liter?", ["1000", "1,000", "thousand"]),
    ("How many millimeters are in a centimeter?", ["10", "ten"]),
    ("How many days are in a leap year?", ["366"]),
    ("How many days are in a regular year?", ["365"]),
    ("How many weeks are in a year?", ["52", "fifty-two"]),
    ("How many years are in a century?", ["100", "hundred"]),
    ("How many years are in a decade?", ["10", "ten"]),
    ("How many inches are in a foot?", ["12", "twelve"]),
    ("How many feet are in a yard?", ["3", "three"]),
    ("How many ounces are in a pound?", ["16", "sixteen"]),
    ("How many cents are in a dollar?", ["100", "hundred"]),
    ("How many minutes are in two hours?", ["120"]),
    ("How many seconds are in an hour?", ["3600", "3,600"]),
    ("How many hours are in two days?", ["48"]),
    ("How many days are in two weeks?", ["14", "fourteen"]),
    ("How many eggs are in a dozen?", ["12", "twelve"]),
    ("How many degrees are in a right angle?", ["90", "ninety"]),
]
SAYINGS = [
    ("Complete the saying: An apple a day keeps the ... away.", ["doctor"]),
    ("Complete the saying: The early bird catches the ...", ["worm"]),
    ("Complete the saying: Actions speak louder than ...", ["words"]),
    ("Complete the saying: Better late than ...", ["never"]),
    ("Complete the saying: Practice makes ...", ["perfect"]),
    ("Complete the saying: Don't judge a book by its ...", ["cover"]),
    ("Complete the saying: When in Rome, do as the ... do.", ["Romans"]),
    ("Complete the saying: Every cloud has a silver ...", ["lining"]),
    ("Complete the saying: A picture is worth a thousand ...", ["words"]),
    ("Complete the saying: Curiosity killed the ...", ["cat"]),
    ("Complete the saying: Two heads are better than ...", ["one"]),
    ("Complete the saying: Rome wasn't built in a ...", ["day"]),
    ("Complete the saying: Time is ...", ["money"]),
    ("Complete the saying: Honesty is the best ...", ["policy"]),
    ("Complete the saying: Look before you ...", ["leap"]),
]
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve")
WORDS_TO_SPELL = ("cat", "dog", "sun", "book", "tree", "fish", "milk", "rain", "star", "bird")


def _arithmetic() -> list:
    out = []
    for a, b in ((2, 3), (4, 5), (7, 8), (9, 6), (12, 15), (23, 19), (30, 45), (50, 50), (17, 26), (8, 14),
                 (11, 22), (40, 35), (6, 7), (13, 9), (25, 25), (1, 1), (3, 5), (14, 16), (60, 40), (18, 21),
                 (5, 9), (27, 13), (44, 11), (90, 10), (35, 15)):
        out.append(("arithmetic", f"What is {a} + {b}?", [str(a + b)]))
    for a, b in ((10, 4), (15, 7), (20, 8), (9, 3), (50, 20), (100, 1), (33, 11), (18, 9), (42, 12), (70, 35)):
        out.append(("arithmetic", f"What is {a} - {b}?", [str(a - b)]))
    for a, b in ((2, 3), (3, 4), (5, 5), (6, 7), (8, 9), (9, 9), (10, 10), (4, 12), (7, 7), (11, 3), (12, 12),
                 (6, 8), (3, 9), (2, 50), (5, 20)):
        out.append(("arithmetic", f"What is {a} times {b}?", [str(a * b)]))
    for a, b in ((10, 2), (12, 3), (20, 4), (81, 9), (100, 10), (36, 6), (49, 7), (64, 8), (30, 5), (18, 2)):
        out.append(("arithmetic", f"What is {a} divided by {b}?", [str(a // b)]))
    for n in (2, 3, 4, 5, 10):
        out.append(("arithmetic", f"What is {n} squared?", [str(n * n)]))
    for n, half in ((10, 5), (50, 25), (100, 50), (8, 4), (30, 15)):
        out.append(("arithmetic", f"What is half of {n}?", [str(half)]))
    return out


def _sequences() -> list:
    out = []
    for i, day in enumerate(DAYS):
        out.append(("sequence", f"What day comes after {day}?", [DAYS[(i + 1) % 7]]))
    for i, month in enumerate(MONTHS):
        out.append(("sequence", f"What month comes after {month}?", [MONTHS[(i + 1) % 12]]))
    for i in range(1, 10):
        out.append(("sequence", f"What number comes after {NUMBER_WORDS[i]}?",
                    [NUMBER_WORDS[i + 1], str(i + 1)]))
    return out


def _instructions() -> list:
    out = []
    for word in WORDS_TO_SPELL:
        out.append(("instruction", f"Write the word '{word}' in capital letters.", [word.upper()]))
    for i in (3, 5, 7, 8, 9, 11):
        out.append(("instruction", f"Write the number {NUMBER_WORDS[i]} as digits.", [str(i)]))
    for word in ("apple", "river", "garden", "yellow", "window"):
        out.append(("instruction", f"Repeat this word exactly: {word}", [word]))
    for items, first in ((("red", "green", "blue"), "red"), (("cat", "dog", "cow"), "cat"),
                         (("one", "two", "three"), "one"), (("milk", "bread", "eggs"), "milk")):
        out.append(("instruction", f"What is the first item in this list: {', '.join(items)}?", [first]))
    return out


def items() -> list:
    """Every question, in a fixed order: {"id", "kind", "question", "answers"}."""
    rows = [("capital", f"What is the capital of {country}?", [city]) for country, city in CAPITALS.items()]
    rows += [("opposite", f"What is the opposite of '{word}'?", [opposite]) for word, opposite in OPPOSITES.items()]
    rows += [("fact", q, a) for q, a in FACTS] + [("unit", q, a) for q, a in UNITS]
    rows += [("saying", q, a) for q, a in SAYINGS]
    rows += [("grammar", f"What is the plural of '{word}'?", [plural]) for word, plural in PLURALS.items()]
    rows += [("grammar", f"What is the past tense of '{verb}'?", [past]) for verb, past in PAST_TENSES.items()]
    rows += _arithmetic() + _sequences() + _instructions()
    return [{"id": i, "kind": kind, "question": question, "answers": list(answers)}
            for i, (kind, question, answers) in enumerate(rows)]


def _normal(text: str) -> str:
    return " " + re.sub(r"[^0-9a-z]+", " ", text.lower()).strip() + " "


def is_right(reply: str, answers: list) -> bool:
    """One accepted answer appears in the reply as whole words, case and punctuation aside ("1,000" matches
    "1000" and "1,000"; "Paris." matches "paris")."""
    said = _normal(reply)
    squeezed = _normal(reply.replace(",", ""))
    return any(_normal(answer) in said or _normal(answer.replace(",", "")) in squeezed for answer in answers)
