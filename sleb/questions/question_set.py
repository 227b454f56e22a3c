"""Short questions with accepted answers, written for this project: what a chat model's user asks and can
check at a glance (facts, arithmetic, units, opposites, sayings, simple instructions).

Each item is {"id", "kind", "question", "answers", "case"}: `answers` holds every accepted form (a number's
digits and its words, every valid alternative), `case` is True where the question asks for a case (capital
letters). How a reply is scored against an item: sleb/questions/scoring.py. No question holds its own answer,
but for the instructions that must (repeat a word, name a list's first item), where scoring tells a copy of
the question from an answer. The set is built from the tables below, deterministically; `items()` returns it
in a fixed order, and `digest()` (scoring.py) names it and its scoring in every result measured on it.
"""


CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "Russia": "Moscow", "Egypt": "Cairo", "Greece": "Athens",
    "Ireland": "Dublin", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen",
    "Austria": "Vienna", "Poland": "Warsaw", "Hungary": "Budapest", "Belgium": "Brussels",
    "the Netherlands": "Amsterdam", "the United Kingdom": "London", "Canada": "Ottawa", "Mexico": "Mexico City",
    "Argentina": "Buenos Aires", "Peru": "Lima", "Chile": "Santiago", "Colombia": "Bogotá", "Cuba": "Havana",
    "Kenya": "Nairobi", "Thailand": "Bangkok", "South Korea": "Seoul", "India": "New Delhi", "Iran": "Tehran",
    "Turkey": "Ankara", "Australia": "Canberra", "New Zealand": "Wellington", "the United States": "Washington",
    "Switzerland": "Bern", "Czechia": "Prague", "Ukraine": "Kyiv", "Vietnam": "Hanoi", "Indonesia": "Jakarta",
    "the Philippines": "Manila", "Pakistan": "Islamabad", "Nigeria": "Abuja", "Ethiopia": "Addis Ababa",
    "Morocco": "Rabat", "Iceland": "Reykjavík", "Romania": "Bucharest", "Venezuela": "Caracas",
}
# Other names a capital goes by in English.
OTHER_NAMES = {"Kyiv": ["Kiev"], "New Delhi": ["Delhi"], "Bern": ["Berne"], "Tehran": ["Teheran"],
               "Washington": ["Washington, D.C."], "Hanoi": ["Ha Noi"]}
PLURALS = {"mouse": "mice", "child": "children", "foot": "feet", "tooth": "teeth", "man": "men", "woman": "women",
           "goose": "geese", "person": ["people", "persons"], "leaf": "leaves", "knife": "knives"}
PAST_TENSES = {"go": "went", "eat": "ate", "see": "saw", "run": "ran", "write": "wrote", "swim": "swam",
               "buy": "bought", "take": "took", "sing": "sang", "drink": "drank"}
OPPOSITES = {  # every common opposite is accepted: old -> young or new, light -> dark or heavy
    "hot": ["cold"], "big": ["small", "little"], "up": ["down"], "day": ["night"], "fast": ["slow"],
    "happy": ["sad", "unhappy"], "open": ["closed", "shut", "close"], "light": ["dark", "heavy"], "old": ["young", "new"],
    "tall": ["short"], "full": ["empty"], "wet": ["dry"], "early": ["late"], "hard": ["soft", "easy"],
    "rich": ["poor"], "strong": ["weak"], "thick": ["thin"], "heavy": ["light"], "inside": ["outside"],
    "win": ["lose"], "push": ["pull"], "buy": ["sell"], "true": ["false"], "love": ["hate"], "north": ["south"],
    "east": ["west"], "left": ["right"], "first": ["last"], "begin": ["end", "finish"], "yes": ["no"],
}
FACTS = [
    ("What color is the sky on a clear day?", ["blue"]),
    ("What color is grass?", ["green"]),
    ("What color is snow?", ["white"]),
    ("What color are ripe bananas?", ["yellow"]),
    ("How many legs does a spider have?", ["8"]),
    ("How many legs does a dog have?", ["4"]),
    ("How many legs does a bird have?", ["2"]),
    ("How many days are in a week?", ["7"]),
    ("How many months are in a year?", ["12"]),
    ("How many hours are in a day?", ["24"]),
    ("How many minutes are in an hour?", ["60"]),
    ("How many seconds are in a minute?", ["60"]),
    ("How many sides does a triangle have?", ["3"]),
    ("How many sides does a square have?", ["4"]),
    ("How many sides does a hexagon have?", ["6"]),
    ("How many continents are there?", ["7"]),
    ("What is the largest planet in our solar system?", ["Jupiter"]),
    ("Which planet is known as the Red Planet?", ["Mars"]),
    ("What planet do we live on?", ["Earth"]),
    ("What is the closest star to Earth?", ["Sun"]),
    ("What do bees make?", ["honey", "wax", "beeswax"]),
    ("What animal says moo?", ["cow", "cows", "cattle"]),
    ("What animal barks?", ["dog", "dogs"]),
    ("What animal is known as the king of the jungle?", ["lion", "lions"]),
    ("What is the largest ocean on Earth?", ["Pacific"]),
    ("What is frozen water called?", ["ice"]),
    ("What gas do plants take in from the air?", ["carbon dioxide", "CO2"]),
    ("What gas do humans need to breathe?", ["oxygen"]),
    ("At what temperature in Celsius does water freeze?", ["0"]),
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
    ("How many letters are in the English alphabet?", ["26"]),
    ("What do you call a baby cat?", ["kitten", "kittens", "kitty"]),
    ("What do you call a baby dog?", ["puppy", "puppies", "pup"]),
    ("What is the main ingredient of bread?", ["flour", "wheat"]),
    ("What fruit is used to make wine?", ["grape", "grapes"]),
    ("What instrument has black and white keys?", ["piano", "keyboard", "organ", "harpsichord"]),
    ("What is the hardest natural substance?", ["diamond", "diamonds"]),
]
UNITS = [
    ("How many centimeters are in a meter?", ["100"]),
    ("How many meters are in a kilometer?", ["1000"]),
    ("How many grams are in a kilogram?", ["1000"]),
    ("How many milliliters are in a liter?", ["1000"]),
    ("How many millimeters are in a centimeter?", ["10"]),
    ("How many days are in a leap year?", ["366"]),
    ("How many days are in a regular year?", ["365"]),
    ("How many weeks are in a year?", ["52"]),
    ("How many years are in a century?", ["100"]),
    ("How many years are in a decade?", ["10"]),
    ("How many inches are in a foot?", ["12"]),
    ("How many feet are in a yard?", ["3"]),
    ("How many ounces are in a pound?", ["16"]),
    ("How many cents are in a dollar?", ["100"]),
    ("How many minutes are in two hours?", ["120"]),
    ("How many seconds are in an hour?", ["3600"]),
    ("How many hours are in two days?", ["48"]),
    ("How many days are in two weeks?", ["14"]),
    ("How many eggs are in a dozen?", ["12"]),
    ("How many degrees are in a right angle?", ["90"]),
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
UNITS_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
               "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen")
TENS_WORDS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
WORDS_TO_SPELL = ("cat", "dog", "sun", "book", "tree", "fish", "milk", "rain", "star", "bird")


def number_words(n: int) -> list:
    """The ways English writes a whole number from 0 to 9999 in words: 144 -> "one hundred forty-four" and
    "one hundred and forty-four"; 100 -> "one hundred" and "a hundred"."""
    if n < 20:
        return [UNITS_WORDS[n]]
    if n < 100:
        return [TENS_WORDS[n // 10] + ("" if n % 10 == 0 else "-" + UNITS_WORDS[n % 10])]
    for size, name in ((1000, "thousand"), (100, "hundred")):
        if n >= size:
            head, rest = divmod(n, size)
            heads = number_words(head) + (["a"] if head == 1 else [])
            if not rest:
                return [f"{word} {name}" for word in heads]
            tails = number_words(rest)
            joined = [f"{word} {name} {tail}" for word in heads[:1] for tail in tails]
            if rest < 100:  # British English says "and" before the last part
                joined += [f"{word} {name} and {tail}" for word in heads[:1] for tail in tails]
            return joined
    raise AssertionError(n)


def with_words(answers: list) -> list:
    """Every answer, and a whole number's words after its digits: "five" is as right as "5"."""
    out = []
    for answer in answers:
        out += [answer] + (number_words(int(answer)) if answer.isdigit() else [])
    return out


def _arithmetic() -> list:
    """Sums, differences, products, quotients: none has its answer among its own numbers (18 - 9 would pass
    on a reply that copies the question)."""
    out = []
    for a, b in ((2, 3), (4, 5), (7, 8), (9, 6), (12, 15), (23, 19), (30, 45), (50, 50), (17, 26), (8, 14),
                 (11, 22), (40, 35), (6, 7), (13, 9), (25, 25), (1, 1), (3, 5), (14, 16), (60, 40), (18, 21),
                 (5, 9), (27, 13), (44, 11), (90, 10), (35, 15)):
        out.append(("arithmetic", f"What is {a} + {b}?", [str(a + b)]))
    for a, b in ((10, 4), (15, 7), (20, 8), (9, 3), (50, 20), (100, 1), (33, 11), (18, 7), (42, 12), (70, 25)):
        out.append(("arithmetic", f"What is {a} - {b}?", [str(a - b)]))
    for a, b in ((2, 3), (3, 4), (5, 5), (6, 7), (8, 9), (9, 9), (10, 10), (4, 12), (7, 7), (11, 3), (12, 12),
                 (6, 8), (3, 9), (2, 50), (5, 20)):
        out.append(("arithmetic", f"What is {a} times {b}?", [str(a * b)]))
    for a, b in ((10, 2), (12, 3), (20, 4), (72, 9), (90, 3), (42, 6), (56, 7), (63, 9), (30, 5), (18, 2)):
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
        out.append(("sequence", f"What number comes after {UNITS_WORDS[i]}?", [str(i + 1)]))
    return out


def _instructions() -> list:
    """(kind, question, answers, case): the capital-letter questions are the only ones scored with case."""
    out = []
    for word in WORDS_TO_SPELL:
        out.append(("instruction", f"Write the word '{word}' in capital letters.", [word.upper()], True))
    for i in (3, 5, 7, 8, 9, 11):  # digits asked for: the number's words are not an answer here
        out.append(("instruction", f"Write the number {UNITS_WORDS[i]} as digits.", [str(i)], False))
    for word in ("apple", "river", "garden", "yellow", "window"):
        out.append(("instruction", f"Repeat this word exactly: {word}", [word], False))
    for items, first in ((("red", "green", "blue"), "red"), (("cat", "dog", "cow"), "cat"),
                         (("one", "two", "three"), "one"), (("milk", "bread", "eggs"), "milk")):
        out.append(("instruction", f"What is the first item in this list: {', '.join(items)}?", [first], False))
    return out


def items() -> list:
    """Every question, in a fixed order: {"id", "kind", "question", "answers", "case"}."""
    rows = [("capital", f"What is the capital of {country}?", [city] + OTHER_NAMES.get(city, []))
            for country, city in CAPITALS.items()]
    rows += [("opposite", f"What is the opposite of '{word}'?", opposites) for word, opposites in OPPOSITES.items()]
    rows += [("fact", q, with_words(a)) for q, a in FACTS] + [("unit", q, with_words(a)) for q, a in UNITS]
    rows += [("saying", q, a) for q, a in SAYINGS]
    rows += [("grammar", f"What is the plural of '{word}'?", plural if isinstance(plural, list) else [plural])
             for word, plural in PLURALS.items()]
    rows += [("grammar", f"What is the past tense of '{verb}'?", [past]) for verb, past in PAST_TENSES.items()]
    rows += [(kind, question, with_words(answers)) for kind, question, answers in _arithmetic() + _sequences()]
    rows = [(kind, question, answers, False) for kind, question, answers in rows] + _instructions()
    return [{"id": i, "kind": kind, "question": question, "answers": list(answers), "case": case}
            for i, (kind, question, answers, case) in enumerate(rows)]
