"""Spoken-language understanding (M4 T49): the words that fill the slots of `slu_templates`, as
people say them (times and numbers both spelled out and in digits, as Whisper writes either).

Every pool is split in two: `train` fills the training phrasings; `held_out` is seen only in
evaluation, and no held-out value occurs in a training sentence (tests/adapters/
test_slu_data.py checks this on generated text).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Pool:
    """One list, split: `train` for training, `held_out` only for evaluation."""

    train: tuple[str, ...]
    held_out: tuple[str, ...]


# slot -> the words that fill it.
VALUES: dict[str, Pool] = {
    "room": Pool(
        train=("kitchen", "living room", "bedroom", "bathroom", "hallway", "office", "dining room",
               "garage", "kids' room", "attic", "master bedroom", "study", "den", "porch",
               "backyard", "playroom", "family room", "entryway", "closet", "sunroom",
               "spare bedroom", "front hall"),
        held_out=("nursery", "guest room", "basement", "patio", "laundry room")),
    "level": Pool(
        train=("50 percent", "thirty percent", "ten percent", "75 percent", "twenty percent",
               "80 percent", "forty percent", "100 percent", "5 percent", "seventy percent",
               "25 percent", "forty five percent", "fifty percent", "85 percent",
               "seventy five percent", "one percent", "95 percent", "twelve percent", "65 percent",
               "eighty percent", "45 percent", "30%"),
        held_out=("sixty percent", "35 percent", "ninety percent", "15 percent",
                  "twenty five percent")),
    "time": Pool(
        train=("seven am", "7:30 am", "six thirty", "6 am", "eight fifteen in the morning", "noon",
               "9 pm", "ten o'clock", "5:45 am", "half past six", "midnight", "eight pm", "7 am",
               "six am", "quarter past eight", "half past seven", "8:45 am", "ten thirty pm",
               "10 pm", "nine in the morning", "seven in the evening", "1 pm",
               "two thirty in the afternoon", "quarter to six", "5 am", "eleven thirty",
               "twelve fifteen", "6:50", "four am", "7:05 am"),
        held_out=("quarter to seven", "6:15 am", "five forty five", "eleven pm",
                  "4:30 in the morning")),
    "duration": Pool(
        train=("ten minutes", "5 minutes", "one hour", "thirty seconds", "two hours",
               "twenty minutes", "45 minutes", "fifteen minutes", "three minutes",
               "one and a half minutes", "2 minutes", "eight minutes", "an hour", "half an hour",
               "forty minutes", "one minute", "4 minutes", "six minutes", "3 hours",
               "fifty seconds", "10 seconds", "eleven minutes", "35 minutes",
               "two and a half minutes", "nine minutes"),
        held_out=("twelve minutes", "90 seconds", "one and a half hours", "seven minutes",
                  "25 minutes")),
    "artist": Pool(
        train=("Taylor Swift", "the Beatles", "Adele", "Drake", "Coldplay", "Queen", "Ed Sheeran",
               "Beyonce", "Miles Davis", "Bob Marley", "Billie Eilish", "Kendrick Lamar",
               "Elton John", "Lady Gaga", "Stevie Wonder", "Rihanna", "Eminem", "Shakira",
               "Frank Sinatra", "Nirvana", "Daft Punk", "Metallica", "Ariana Grande",
               "Johnny Cash", "Bach", "the Rolling Stones"),
        held_out=("Fleetwood Mac", "Norah Jones", "Bruno Mars", "Radiohead", "Dolly Parton")),
    "genre": Pool(
        train=("jazz", "rock", "classical", "hip hop", "country", "lo-fi", "pop", "blues",
               "reggae", "metal", "soul", "r and b", "electronic", "indie", "punk", "disco",
               "opera", "salsa", "k-pop", "ambient", "edm", "latin", "bluegrass", "grunge",
               "acoustic", "swing"),
        held_out=("bossa nova", "techno", "gospel", "folk", "funk")),
    "contact": Pool(
        train=("Mom", "Dad", "Sarah", "John", "Emily", "David", "Grandma", "Michael", "Jessica",
               "Alex", "Doctor Patel", "Chris", "Grandpa", "Lisa", "Tom", "Anna", "James", "Maria",
               "Kevin", "Rachel", "Uncle Joe", "Aunt Carol", "Sophie", "Daniel", "Coach Miller",
               "Nina"),
        held_out=("Olivia", "Uncle Ben", "Priya", "Marcus", "Aunt Linda")),
    "message": Pool(
        train=("I'm running late", "see you at six", "call me back when you can",
               "dinner is ready", "I'll be home soon", "happy birthday", "don't forget the keys",
               "on my way", "can you pick up the kids", "the meeting moved to three", "love you",
               "I'll call you later", "good night", "I miss you", "don't wait up",
               "the door is unlocked", "I'm at the gym", "the game starts at eight",
               "congratulations", "where are you", "bring your charger", "I'm leaving work now",
               "running a bit behind"),
        held_out=("I'm stuck in traffic", "thanks for lunch", "good luck with the exam",
                  "let's meet at the station", "the package arrived")),
    "city": Pool(
        train=("Paris", "London", "Tokyo", "New York", "Chicago", "Berlin", "Madrid", "Seattle",
               "Toronto", "Sydney", "Boston", "Rome", "Los Angeles", "San Francisco", "Miami",
               "Dublin", "Amsterdam", "Mexico City", "Cairo", "Mumbai", "Seoul", "Vancouver",
               "Austin", "Prague", "Athens", "Cape Town"),
        held_out=("Lisbon", "Nairobi", "Denver", "Osaka", "Buenos Aires")),
    "date": Pool(
        train=("today", "tomorrow", "tonight", "this weekend", "next week", "this afternoon",
               "tomorrow morning", "Monday", "Saturday", "tomorrow night", "Friday", "Sunday",
               "this week", "tomorrow afternoon", "Wednesday", "Tuesday", "later today",
               "this morning", "over the weekend", "tomorrow evening"),
        held_out=("the day after tomorrow", "this evening", "Thursday", "next weekend")),
    "temperature": Pool(
        train=("21 degrees", "seventy two degrees", "20 degrees", "sixty eight degrees",
               "22 degrees", "seventy degrees", "19 degrees", "eighteen degrees", "75 degrees",
               "twenty three degrees", "23 degrees", "sixty nine degrees", "72 degrees",
               "twenty degrees", "sixty six degrees", "78 degrees", "sixteen degrees",
               "twenty one degrees", "70 degrees", "seventy one degrees"),
        held_out=("sixty five degrees", "24 degrees", "seventy four degrees", "17 degrees",
                  "twenty five degrees")),
    "place": Pool(
        train=("the airport", "work", "the nearest gas station", "the train station",
               "Central Park", "the closest pharmacy", "the office", "the mall", "grandma's house",
               "the beach", "the zoo", "the hotel", "home", "the nearest coffee shop",
               "the post office", "downtown", "the museum", "the gym", "Times Square",
               "the closest ATM", "the dentist", "my parents' house", "the supermarket",
               "the bus station", "the school"),
        held_out=("the stadium", "the nearest hospital", "the public library", "Union Square",
                  "the ferry terminal")),
    "item": Pool(
        train=("milk", "eggs", "bread", "bananas", "coffee", "paper towels", "dish soap", "apples",
               "batteries", "toothpaste", "sunscreen", "chicken", "butter", "cheese",
               "orange juice", "tomatoes", "onions", "garlic", "pasta", "laundry detergent",
               "trash bags", "cereal", "flour", "shampoo", "cat litter", "tea"),
        held_out=("olive oil", "yogurt", "light bulbs", "rice", "dog food")),
    "list": Pool(
        train=("shopping", "grocery", "to do", "packing", "hardware store", "party", "errands",
               "birthday", "wish", "vacation", "chores", "work"),
        held_out=("camping", "Christmas", "moving")),

}
