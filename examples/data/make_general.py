"""Generates `general.jsonl`: a small general prompt set for measuring a fine-tune's side effects.

Each record is a pair, ``{"prompt": ..., "completion": ..., "kind": ...}``: a prompt someone might give a small
assistant model (an everyday question, a short fact, an instruction, a bit of code, arithmetic, a short story, a
definition, a unit conversion, a sentence to rewrite or continue) and a short, correct answer. None of it is the
demo task (JSON extraction). `jlora.side_effects` scores the whole texts (KL between the base and the adapted
model, top-1 agreement, loss) and continues the prompts greedily.

Everything here was written for this project: the facts, questions, code, word lists and story pieces below are
our own text, and the records are assembled from them with a fixed seed (so re-running rewrites a byte-identical
file). Licence: the same as jlora (Apache-2.0).

Run: `python examples/data/make_general.py [--out FILE] [--seed N]`.
"""

import argparse
import json
import os
import random

# ------------------------------------------------------------------------------------------ short facts
CAPITALS = [
    ("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"), ("Canada", "Ottawa"),
    ("Australia", "Canberra"), ("Kenya", "Nairobi"), ("Egypt", "Cairo"), ("Brazil", "Brasília"),
    ("Argentina", "Buenos Aires"), ("Japan", "Tokyo"), ("South Korea", "Seoul"), ("India", "New Delhi"),
    ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Portugal", "Lisbon"), ("Greece", "Athens"),
    ("Poland", "Warsaw"), ("Ireland", "Dublin"), ("Mexico", "Mexico City"), ("Peru", "Lima"),
    ("Chile", "Santiago"), ("Vietnam", "Hanoi"), ("Thailand", "Bangkok"), ("Turkey", "Ankara"),
    ("Morocco", "Rabat"), ("Nigeria", "Abuja"), ("Ghana", "Accra"), ("New Zealand", "Wellington"),
    ("Finland", "Helsinki"), ("Austria", "Vienna"), ("Hungary", "Budapest"), ("Denmark", "Copenhagen"),
    ("Colombia", "Bogotá"), ("the Philippines", "Manila"), ("Ethiopia", "Addis Ababa"), ("Cuba", "Havana"),
    ("Iceland", "Reykjavík"), ("Senegal", "Dakar"), ("Uruguay", "Montevideo"),
]
CAPITAL_QUESTIONS = ["What is the capital of {country}?", "Which city is the capital of {country}?",
                     "Name the capital city of {country}.", "What's the capital of {country}?"]
CAPITAL_ANSWERS = ["The capital of {country} is {city}.", "{city} is the capital of {country}.", "{city}."]

FACTS = [
    ("What is the boiling point of water at sea level?",
     "Water boils at 100 degrees Celsius, or 212 degrees Fahrenheit, at sea level."),
    ("How many continents are there?",
     "Seven: Africa, Antarctica, Asia, Australia (Oceania), Europe, North America and South America."),
    ("What gas do plants take from the air to make their food?",
     "Carbon dioxide. Using the energy of sunlight, plants turn it and water into sugar and give off oxygen."),
    ("Which planet is closest to the Sun?", "Mercury."),
    ("What is the largest ocean on Earth?", "The Pacific Ocean, which covers about a third of the planet."),
    ("How many days are there in a leap year?", "366 days; the extra one is the 29th of February."),
    ("What is the chemical symbol for gold?", "Au, from the Latin word aurum."),
    ("How many legs does a spider have?", "Eight. Insects have six, which is one way to tell them apart."),
    ("At what temperature does water freeze in Fahrenheit?", "32 degrees Fahrenheit, which is 0 degrees Celsius."),
    ("Who wrote the play Romeo and Juliet?", "William Shakespeare, in the 1590s."),
    ("Why is the sky blue?",
     "Air molecules scatter short, blue wavelengths of sunlight much more than long, red ones, so blue light "
     "reaches our eyes from every part of the sky."),
    ("How far away is the Moon?", "On average about 384,000 kilometres from Earth."),
    ("How fast does light travel?", "About 300,000 kilometres per second in a vacuum."),
    ("How many bones does an adult human have?", "206."),
    ("What is the largest planet in our solar system?", "Jupiter, a gas giant more than 11 times wider than Earth."),
    ("What is water made of?", "Each water molecule, H2O, has two hydrogen atoms bonded to one oxygen atom."),
    ("Which organ pumps blood around the body?", "The heart."),
    ("What do bees make from the nectar of flowers?", "Honey. They also make wax to build their combs."),
    ("What is the tallest mountain above sea level?", "Mount Everest, about 8,849 metres high."),
    ("How many minutes are there in a day?", "1,440 minutes: 24 hours times 60 minutes."),
    ("What is the longest river in Africa?", "The Nile."),
    ("When did people first walk on the Moon?", "In July 1969, on the Apollo 11 mission."),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci."),
    ("What language is mostly spoken in Brazil?", "Portuguese."),
    ("What are the three primary colours of light?", "Red, green and blue."),
    ("What is the smallest prime number?", "2, which is also the only even prime number."),
    ("What does a thermometer measure?", "Temperature."),
    ("What is the hardest natural material?", "Diamond."),
    ("How many sides does a hexagon have?", "Six."),
    ("What is the currency of Japan?", "The yen."),
    ("What is the largest desert in the world?",
     "Counting cold deserts, Antarctica. The largest hot desert is the Sahara."),
    ("What causes the seasons?",
     "The tilt of Earth's axis. As Earth goes around the Sun, each hemisphere leans towards the Sun for part of "
     "the year, which is its summer, and away from it for another part, which is its winter."),
    ("How many players does a football team have on the pitch?", "Eleven, including the goalkeeper."),
    ("How many strings does a standard guitar have?", "Six."),
    ("What is the square root of 144?", "12, because 12 times 12 is 144."),
    ("Which animal is the largest on Earth?", "The blue whale, which can grow to about 30 metres long."),
    ("What do caterpillars turn into?", "Butterflies or moths, after a stage inside a chrysalis or cocoon."),
    ("How many hours does it take Earth to spin once?", "About 24 hours, which is why a day is that long."),
    ("What is the opposite of 'ancient'?", "Modern."),
    ("Which metal is liquid at room temperature?", "Mercury."),
]

DEFINITIONS = [
    ("curious", "eager to know or learn something"),
    ("generous", "willing to give more of your time, money or help than is expected"),
    ("fragile", "easily broken or damaged"),
    ("reluctant", "unwilling and hesitant to do something"),
    ("abundant", "existing in large amounts; more than enough"),
    ("brief", "lasting only a short time"),
    ("ancient", "belonging to the very distant past"),
    ("to postpone", "to move an event or task to a later time"),
    ("a habitat", "the natural home of an animal or plant"),
    ("an estimate", "a rough calculation or guess of a size, value or amount"),
    ("a volunteer", "a person who offers to do something without being paid or told to"),
    ("humid", "having a lot of water vapour in the air, so it feels damp and sticky"),
    ("to persuade", "to make someone agree or act by giving them good reasons"),
    ("a recipe", "a set of instructions for preparing a dish, with a list of ingredients"),
    ("nocturnal", "active at night rather than during the day"),
    ("a synonym", "a word that means the same or nearly the same as another word"),
    ("to evaporate", "to turn from a liquid into a gas"),
    ("a budget", "a plan for how much money you will spend and on what"),
    ("punctual", "arriving or doing something at the agreed time"),
    ("a deadline", "the latest time by which something must be finished"),
]
DEFINITION_QUESTIONS = ["What does the word '{word}' mean?", "Define '{word}'.",
                        "What is the meaning of '{word}'?", "Explain the word '{word}' in simple terms."]

TRANSLATIONS = [
    ("How do you say 'thank you' in Spanish?", "Gracias."),
    ("How do you say 'good morning' in French?", "Bonjour."),
    ("What is 'thank you' in German?", "Danke."),
    ("How do you say 'hello' in Italian?", "Ciao, or more formally, buongiorno."),
    ("What does the Spanish word 'biblioteca' mean?", "Library."),
    ("What does 'merci beaucoup' mean?", "It is French for 'thank you very much'."),
    ("How do you say 'thank you' in Portuguese?", "Obrigado if you are a man, obrigada if you are a woman."),
    ("What does the German word 'Hund' mean?", "Dog."),
]

# ------------------------------------------------------------------------------------------ everyday questions
EVERYDAY = [
    ("How do I keep bread fresh for longer?",
     "Keep it at room temperature in a bread box or a paper bag, and freeze the slices you will not eat within "
     "a few days. The fridge makes bread go stale faster."),
    ("How long should I boil an egg for a soft yolk?",
     "About six minutes from when it goes into boiling water, then cool it under cold water for a minute."),
    ("My houseplant's leaves are turning yellow. What could be wrong?",
     "Most often it is too much water: make sure the pot drains and let the top of the soil dry out between "
     "waterings. Too little light can also cause it, and the oldest leaves yellow naturally."),
    ("How do I get a coffee stain out of a shirt?",
     "Rinse it from the back with cold water as soon as you can, rub in a little liquid detergent, leave it for "
     "a few minutes and wash as usual. Avoid hot water until the stain is gone."),
    ("How can I fall asleep more easily?",
     "Go to bed at the same time every night, keep the room dark and cool, avoid screens and caffeine in the "
     "evening, and get up for a while if you lie awake for more than twenty minutes."),
    ("How can I spend less on groceries?",
     "Plan the week's meals, shop with a list, buy staples in bulk, choose seasonal vegetables and cook extra to "
     "eat as leftovers."),
    ("What's a good way to remember people's names?",
     "Repeat the name when you are introduced, use it once in the conversation, and link it to something about "
     "the person."),
    ("How often should I water a cactus?",
     "Every two to four weeks in spring and summer, when the soil is completely dry, and hardly at all in winter."),
    ("How do I make a good cup of tea?",
     "Heat fresh water, pour it over the tea, let black tea steep for three to five minutes or green tea for two "
     "to three in slightly cooler water, then remove the leaves."),
    ("What can I cook with rice, eggs and frozen peas?",
     "Egg fried rice: fry the cooked rice in a hot pan with a little oil, add the peas, push everything aside, "
     "scramble the eggs in the gap, then mix it all with a splash of soy sauce."),
    ("How do I politely turn down an invitation?",
     "Thank the person, say clearly that you cannot come, and if you like, suggest another time. You do not need "
     "a long explanation."),
    ("How can I stay focused while studying?",
     "Put your phone in another room, work in blocks of about 25 minutes with short breaks, and decide before "
     "each block exactly what you want to finish."),
    ("How do I clean a cast-iron pan?",
     "Wash it with hot water and a brush, dry it straight away on the stove, and rub in a thin layer of oil "
     "before putting it away."),
    ("Why does my phone battery run out so quickly?",
     "Bright screens, apps refreshing in the background, weak mobile signal and an ageing battery are the usual "
     "causes. The battery settings show which apps use the most."),
    ("What is a quick, healthy breakfast?",
     "Oats with yoghurt and fruit, wholegrain toast with eggs, or a banana with a handful of nuts."),
    ("How do I fix a flat bicycle tyre?",
     "Take the wheel off, lever the tyre off the rim, find the hole in the inner tube, patch it or fit a new tube, "
     "check the tyre for anything sharp, then refit it and pump it up."),
    ("What should I bring on a day hike?",
     "Water, snacks, a map or charged phone, sun cream, a warm layer and a rain jacket, and shoes that you have "
     "already walked in."),
    ("How do I write a short thank-you note?",
     "Name the gift or favour, say how you used it or what it meant to you, and end with a warm line such as "
     "'I hope to see you soon.'"),
    ("Is it worth walking two kilometres instead of taking the bus?",
     "Usually yes, if you have the time: it takes about 25 minutes at a normal pace and is good exercise."),
    ("How do I stop onions from making me cry?",
     "Use a very sharp knife, chill the onion for a few minutes before cutting, and leave the root end until last."),
    ("How can I make my small flat feel bigger?",
     "Use light colours, a large mirror opposite the window, furniture with legs, and keep surfaces clear."),
    ("What should I do if I lock myself out?",
     "Check whether anyone else has a key, then call a licensed locksmith and ask for the price before they come."),
]

# ------------------------------------------------------------------------------------------ instructions
CATEGORIES = {
    "fruits": ["apples", "pears", "bananas", "cherries", "plums", "mangoes", "oranges", "grapes", "peaches", "kiwis"],
    "vegetables": ["carrots", "spinach", "broccoli", "leeks", "peppers", "courgettes", "cabbage", "beetroot",
                   "onions", "peas"],
    "musical instruments": ["the violin", "the piano", "the flute", "the drums", "the cello", "the trumpet",
                            "the guitar", "the harp", "the clarinet"],
    "sports played with a ball": ["tennis", "basketball", "volleyball", "cricket", "golf", "rugby", "handball",
                                  "baseball", "table tennis"],
    "birds": ["robins", "eagles", "sparrows", "owls", "parrots", "penguins", "swans", "pelicans", "herons"],
    "mammals that live in the sea": ["dolphins", "whales", "seals", "sea otters", "manatees", "walruses"],
    "things you find in a kitchen": ["a kettle", "a chopping board", "a whisk", "a colander", "a frying pan",
                                     "a rolling pin", "a toaster", "a grater"],
    "planets": ["Mercury", "Venus", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune"],
}
LIST_PROMPTS = ["Name three {cat}.", "List three {cat}.", "Give me three examples of {cat}.",
                "Can you name three {cat}?"]

REWRITES = [
    ("hey, can u send me the file asap?", "Could you please send me the file as soon as possible?"),
    ("the meeting got moved to thursday, sorry bout that", "The meeting has been moved to Thursday. I apologise "
                                                           "for the change."),
    ("we can't make it, something came up", "Unfortunately we are unable to attend, as something has come up."),
    ("thx for the help yesterday, it was awesome", "Thank you for your help yesterday; it was much appreciated."),
    ("the printer's broken again, someone pls fix it", "The printer is out of order again. Could someone please "
                                                       "repair it?"),
    ("gonna be late, traffic is crazy", "I will be late because the traffic is very heavy."),
    ("your order's on its way, should be there tmrw", "Your order has been dispatched and should arrive "
                                                      "tomorrow."),
    ("can we talk about the budget later?", "Could we discuss the budget at a later time?"),
    ("no idea where the keys are, did u take them?", "I cannot find the keys. Did you take them, by any chance?"),
    ("the report is kinda long, maybe cut it down", "The report is rather long; perhaps it could be shortened."),
]
REWRITE_PROMPTS = ["Rewrite this more formally: {text}", "Make this sentence polite and formal: {text}",
                   "Rewrite in a professional tone: {text}"]

SUMMARIES = [
    ("The town library will close for two weeks in August while the roof is repaired. Books due during that "
     "time can be returned to the drop box at the community centre, and loans will be extended automatically.",
     "The library closes for two weeks in August for roof repairs; loans are extended and books can be returned "
     "at the community centre."),
    ("Researchers followed 2,000 adults for ten years and found that those who walked at least 7,000 steps a day "
     "had fewer heart problems than those who walked less, even after accounting for diet and smoking.",
     "A ten-year study found that adults walking 7,000 or more steps a day had fewer heart problems."),
    ("After three days of heavy rain, the river rose above its banks on Tuesday night. Several roads near the "
     "old bridge are closed, and residents are asked to avoid the area until the water goes down.",
     "Heavy rain made the river flood on Tuesday night, closing roads near the old bridge."),
    ("The bakery on Mill Street has a new owner, who plans to keep the traditional recipes but will open an hour "
     "earlier and add a small seating area by the window.",
     "The Mill Street bakery's new owner keeps the recipes but opens earlier and adds seating."),
    ("Our team finished the project a week ahead of schedule. The testing phase found only minor issues, all of "
     "which were fixed, and the client has approved the final version.",
     "The project finished a week early, passed testing after minor fixes, and the client approved it."),
    ("Volunteers planted 500 trees in the park on Saturday. The city provided the saplings and tools, and a local "
     "school will help water them during the summer.",
     "Volunteers planted 500 city-supplied trees in the park, and a school will water them over the summer."),
]
SUMMARY_PROMPTS = ["Summarise in one sentence: {text}", "Give a one-sentence summary: {text}",
                   "What is the main point of this text? {text}"]

# ------------------------------------------------------------------------------------------ code
CODE = [
    ("Write a Python function that reverses a string.",
     "def reverse(text):\n    return text[::-1]"),
    ("Write a Python function that checks whether a number is even.",
     "def is_even(n):\n    return n % 2 == 0"),
    ("Write a Python function that returns the largest number in a list.",
     "def largest(numbers):\n    best = numbers[0]\n    for n in numbers[1:]:\n        if n > best:\n"
     "            best = n\n    return best"),
    ("Write a Python function that counts the vowels in a string.",
     "def count_vowels(text):\n    return sum(1 for ch in text.lower() if ch in \"aeiou\")"),
    ("Write a Python function that computes the factorial of n.",
     "def factorial(n):\n    result = 1\n    for k in range(2, n + 1):\n        result *= k\n    return result"),
    ("Write a Python function that returns the first n Fibonacci numbers.",
     "def fibonacci(n):\n    numbers, a, b = [], 0, 1\n    for _ in range(n):\n        numbers.append(a)\n"
     "        a, b = b, a + b\n    return numbers"),
    ("Write a Python function that checks whether a word is a palindrome.",
     "def is_palindrome(word):\n    word = word.lower()\n    return word == word[::-1]"),
    ("Write a Python function that removes duplicates from a list but keeps the order.",
     "def unique(items):\n    seen = set()\n    return [x for x in items if not (x in seen or seen.add(x))]"),
    ("Write a Python function that converts Celsius to Fahrenheit.",
     "def to_fahrenheit(celsius):\n    return celsius * 9 / 5 + 32"),
    ("Write a Python function that counts how often each word appears in a sentence.",
     "from collections import Counter\n\n\ndef word_counts(sentence):\n    return Counter(sentence.lower().split())"),
    ("Write a Python function that reads a text file and returns its lines.",
     "def read_lines(path):\n    with open(path, encoding=\"utf-8\") as f:\n        return f.read().splitlines()"),
    ("Write a Python loop that prints the numbers from 1 to 10.",
     "for i in range(1, 11):\n    print(i)"),
    ("Write FizzBuzz in Python for the numbers 1 to 15.",
     "for i in range(1, 16):\n    if i % 15 == 0:\n        print(\"FizzBuzz\")\n    elif i % 3 == 0:\n"
     "        print(\"Fizz\")\n    elif i % 5 == 0:\n        print(\"Buzz\")\n    else:\n        print(i)"),
    ("Write a JavaScript function that adds two numbers.",
     "function add(a, b) {\n  return a + b;\n}"),
    ("Write a JavaScript function that returns the last element of an array.",
     "function last(items) {\n  return items[items.length - 1];\n}"),
    ("Write an SQL query that selects all customers from Canada.",
     "SELECT * FROM customers WHERE country = 'Canada';"),
    ("Write an SQL query that counts the orders per customer.",
     "SELECT customer_id, COUNT(*) AS orders FROM orders GROUP BY customer_id;"),
    ("How do I list all files, including hidden ones, in a Linux shell?", "Use `ls -a`, or `ls -la` to see "
                                                                          "details as well."),
    ("What does this Python code print? print(len('hello'))", "5, the number of characters in 'hello'."),
    ("What does this Python code print? print(3 * 'ab')", "ababab"),
    ("What is the difference between a list and a tuple in Python?",
     "A list can be changed after it is created (items added, removed or replaced); a tuple cannot. Lists use "
     "square brackets, tuples round ones."),
    ("What does `git commit` do?",
     "It records the staged changes in the repository's history as a new commit, with a message describing them."),
]
ARITH_FUNCS = [("sum", "total", "return sum(numbers)"),
               ("average", "average", "return sum(numbers) / len(numbers)"),
               ("smallest value", "smallest", "return min(numbers)"),
               ("product", "product", "result = 1\n    for n in numbers:\n        result *= n\n    return result")]

# ------------------------------------------------------------------------------------------ arithmetic
NAMES = ["Maria", "Tom", "Aisha", "Kenji", "Lena", "Diego", "Sara", "Ben", "Noor", "Oskar", "Priya", "Luca"]
ITEMS = [("apples", "apple"), ("stickers", "sticker"), ("marbles", "marble"), ("books", "book"),
         ("pencils", "pencil"), ("cookies", "cookie"), ("stamps", "stamp"), ("shells", "shell")]

# ------------------------------------------------------------------------------------------ stories
HEROES = [("a shy hedgehog", "the hedgehog"), ("an old fisherman", "the fisherman"),
          ("a curious robot", "the robot"), ("a young baker", "the baker"), ("a lost kitten", "the kitten"),
          ("a retired teacher", "the teacher"), ("a clumsy dragon", "the dragon"), ("a girl named Ida", "Ida"),
          ("a boy named Sami", "Sami"), ("a tired lighthouse keeper", "the keeper")]
PLACES = ["in a quiet mountain village", "at the edge of a busy harbour", "in a garden full of sunflowers",
          "on a snowy island", "in a library that never closed", "beside a slow green river",
          "in a city of tall glass towers", "at a small train station"]
FINDS = ["a map with one corner torn off", "a key that fitted no door", "a letter addressed to nobody",
         "a seed that glowed at night", "a music box that played a new tune every day", "a pair of worn red boots"]
MIDDLES = ["At first {hero} kept it hidden, but curiosity won, and one evening {hero} set out to learn where it "
           "came from.",
           "{Hero} showed it to everyone in town, and nobody could explain it, so {hero} decided to find out alone.",
           "That night {hero} could not sleep, turning it over and over and wondering who had left it there."]
ENDINGS = ["By the end of the week {hero} had found a friend who had been looking for it for years.",
           "In the end the answer was simple, and {hero} laughed all the way home.",
           "{Hero} never solved the whole mystery, but the search made every day more interesting.",
           "When the truth came out, {hero} gave it back and was thanked with a warm supper."]
STORY_PROMPTS = ["Write a short story about {hero} who lives {place}.", "Tell me a three-sentence story about "
                 "{hero} {place}.", "Write a tiny story: {hero}, {place}, finds something unexpected."]

OPENINGS = [
    ("The last train of the night pulled into the station,",
     " and only one passenger stepped onto the platform, carrying a suitcase much too large for her."),
    ("When the power went out across the whole street,",
     " the neighbours came outside with candles and, for the first time in years, talked until midnight."),
    ("The recipe had been in the family for four generations,",
     " but nobody had ever noticed the small note written in pencil beside the final step."),
    ("Every morning at seven, the old dog waited by the gate,",
     " ears up, for the postman who always kept a biscuit in his pocket."),
    ("It was the first warm day of spring,",
     " and the park filled with people who seemed surprised to remember the sun."),
    ("The scientist checked the results a third time,",
     " then sat back in her chair, because the numbers meant the experiment had worked."),
    ("On the top shelf of the second-hand shop,",
     " between a cracked vase and a box of buttons, sat a clock that still kept perfect time."),
    ("The storm had passed by morning,",
     " leaving the beach covered in driftwood, seaweed and one very confused crab."),
    ("Nobody in the class expected the new student to speak first,",
     " but she raised her hand before the teacher had even finished the question."),
    ("The little boat drifted away from the dock,",
     " and the two friends realised, too late, that neither of them had tied the rope."),
]
CONTINUE_PROMPTS = ["Continue the story: {text}", "Finish this sentence: {text}", "{text}"]

# ------------------------------------------------------------------------------------------ unit conversions
CONVERSIONS = [
    ("kilometres", "metres", 1000), ("metres", "centimetres", 100), ("hours", "minutes", 60),
    ("minutes", "seconds", 60), ("kilograms", "grams", 1000), ("days", "hours", 24), ("weeks", "days", 7),
    ("litres", "millilitres", 1000),
]


def _capital(rng):
    country, city = rng.choice(CAPITALS)
    answer = rng.choice(CAPITAL_ANSWERS).format(country=country, city=city)
    return "fact", rng.choice(CAPITAL_QUESTIONS).format(country=country), " " + answer[0].upper() + answer[1:]


def _list(rng):
    cat = rng.choice(sorted(CATEGORIES))
    a, b, c = rng.sample(CATEGORIES[cat], 3)
    answer = f"{a}, {b} and {c}."
    return "instruction", rng.choice(LIST_PROMPTS).format(cat=cat), " " + answer[0].upper() + answer[1:]


def _arithmetic(rng):
    kind = rng.randrange(6)
    if kind == 0:
        x, y = rng.randint(10, 499), rng.randint(10, 499)
        return "arithmetic", rng.choice(["What is {x} + {y}?", "Add {x} and {y}."]).format(x=x, y=y), \
            f" {x} + {y} = {x + y}."
    if kind == 1:
        x, y = rng.randint(50, 900), rng.randint(1, 49)
        return "arithmetic", rng.choice(["What is {x} - {y}?", "Subtract {y} from {x}."]).format(x=x, y=y), \
            f" {x} - {y} = {x - y}."
    if kind == 2:
        x, y = rng.randint(3, 19), rng.randint(3, 19)
        return "arithmetic", rng.choice(["What is {x} times {y}?", "Multiply {x} by {y}."]).format(x=x, y=y), \
            f" {x} × {y} = {x * y}."
    if kind == 3:
        y, q = rng.randint(2, 12), rng.randint(2, 25)
        return "arithmetic", f"What is {y * q} divided by {y}?", f" {y * q} ÷ {y} = {q}."
    if kind == 4:
        p, base = rng.choice([10, 20, 25, 50, 75]), rng.choice([40, 60, 80, 120, 200, 360])
        return "arithmetic", f"What is {p}% of {base}?", f" {p}% of {base} is {p * base // 100}."
    name = rng.choice(NAMES)
    plural, _ = rng.choice(ITEMS)
    have, give = rng.randint(8, 40), rng.randint(1, 7)
    if rng.random() < 0.5:
        return "arithmetic", (f"{name} has {have} {plural} and gives {give} to a friend. How many {plural} does "
                              f"{name} have left?"), f" {have} - {give} = {have - give}, so {name} has " \
                                                     f"{have - give} {plural} left."
    boxes = rng.randint(2, 9)
    return "arithmetic", (f"{name} buys {boxes} boxes with {give + 2} {plural} in each. How many {plural} is that "
                          f"in total?"), f" {boxes} × {give + 2} = {boxes * (give + 2)} {plural}."


def _conversion(rng):
    big, small, factor = rng.choice(CONVERSIONS)
    n = rng.randint(2, 12)
    return "conversion", rng.choice([f"How many {small} are in {n} {big}?", f"Convert {n} {big} to {small}."]), \
        f" {n} {big} is {n * factor:,} {small}."


def _temperature(rng):
    c = rng.choice([-10, 0, 5, 10, 15, 20, 25, 30, 35, 40, 100])
    return "conversion", f"What is {c} degrees Celsius in Fahrenheit?", \
        f" {c} °C is {c * 9 // 5 + 32} °F (multiply by 9/5 and add 32)."


def _story(rng):
    (hero, short), place, find = rng.choice(HEROES), rng.choice(PLACES), rng.choice(FINDS)
    cap = short[0].upper() + short[1:]
    when = rng.choice(["One day", "One morning", "Late one evening", "On a windy afternoon", "One spring"])
    text = (f"{hero[0].upper() + hero[1:]} lived {place}. {when} {short} found {find}. "
            + rng.choice(MIDDLES).format(hero=short, Hero=cap) + " "
            + rng.choice(ENDINGS).format(hero=short, Hero=cap))
    return "story", rng.choice(STORY_PROMPTS).format(hero=hero, place=place), "\n" + text


def _code_function(rng):
    what, name, body = rng.choice(ARITH_FUNCS)
    return "code", f"Write a Python function that returns the {what} of a list of numbers.", \
        f"\n\ndef {name}(numbers):\n    {body}"


def generate(seed: int = 0) -> list[dict]:
    """All records, shuffled with ``seed``: fixed ones once each, generated ones until their quota is met."""
    rng = random.Random(seed)
    records = []
    records += [("fact", q, " " + a) for q, a in FACTS]
    records += [("fact", q, " " + a) for q, a in TRANSLATIONS]
    records += [("everyday", q, " " + a) for q, a in EVERYDAY]
    records += [("definition", rng.choice(DEFINITION_QUESTIONS).format(word=w),
                 f" {w[0].upper() + w[1:]} {'is' if w.startswith(('a ', 'an ')) else 'means'} {meaning}.")
                for w, meaning in DEFINITIONS]
    records += [("instruction", rng.choice(REWRITE_PROMPTS).format(text=t), " " + a) for t, a in REWRITES]
    records += [("instruction", rng.choice(SUMMARY_PROMPTS).format(text=t), " " + a) for t, a in SUMMARIES]
    records += [("code", q, ("\n\n" if "\n" in a or a.startswith(("SELECT", "def", "function")) else " ") + a)
                for q, a in CODE]
    records += [("continuation", rng.choice(CONTINUE_PROMPTS).format(text=t), c) for t, c in OPENINGS]
    quotas = [(_capital, 36), (_list, 24), (_arithmetic, 60), (_conversion, 16), (_temperature, 8), (_story, 36),
              (_code_function, 4)]
    seen = {p for _, p, _ in records}
    for make, n in quotas:
        made = 0
        while made < n:
            kind, prompt, completion = make(rng)
            if prompt in seen:
                continue
            seen.add(prompt)
            records.append((kind, prompt, completion))
            made += 1
    rng.shuffle(records)
    return [{"prompt": p, "completion": c, "kind": k} for k, p, c in records]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "general.jsonl"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    records = generate(args.seed)
    with open(args.out, "w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {len(records)} general prompts to {args.out}")


if __name__ == "__main__":
    main()
