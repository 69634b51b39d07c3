"""Spoken-language understanding (M4 T49), the data behind `slu_data`: the intents and their
slots, the phrasings people say to a phone, and the words that fill the slots.

Every pool is split in two: `train` makes the adapter's training set; `held_out` is seen only
in evaluation, so the score says whether the adapter learnt the task or the sentences. The
held-out phrasings are built differently from the training ones (not one word swapped), and no
held-out value occurs in a training sentence (tests/adapters/test_slu_data.py checks both on
generated text). Templates are written as people speak; a final "?" marks a question, and
`slu_data` adds the punctuation and casing an ASR model would.

Confusable pairs are there on purpose, as a prompt mixes them up: on/off, set/cancel alarm,
play/pause, volume up/down, call/message, weather "temperature" vs the thermostat.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Pool:
    """One list, split: `train` for training, `held_out` only for evaluation."""

    train: tuple[str, ...]
    held_out: tuple[str, ...]


# intent -> the slots it may carry (a template uses any subset; play_music has artist or genre).
SCHEMA: dict[str, tuple[str, ...]] = {
    "turn_on_light": ("room",),
    "turn_off_light": ("room",),
    "set_brightness": ("level", "room"),
    "set_alarm": ("time",),
    "cancel_alarm": ("time",),
    "set_timer": ("duration",),
    "play_music": ("artist", "genre"),
    "pause_music": (),
    "volume_up": (),
    "volume_down": (),
    "call_contact": ("contact",),
    "send_message": ("contact", "message"),
    "weather_query": ("city", "date"),
    "set_temperature": ("room", "temperature"),
    "navigate_to": ("place",),
    "add_to_list": ("item", "list"),
}

TEMPLATES: dict[str, Pool] = {
    "turn_on_light": Pool(
        train=("turn on the {room} lights", "turn on the lights in the {room}",
               "switch on the {room} light", "lights on in the {room}",
               "can you turn the {room} lights on?", "turn the lights on",
               "switch the light on in the {room}", "please turn on the {room} lamp",
               "I need the lights on in the {room}", "hey, turn on the light",
               "could you switch on the lights in the {room} please?", "put the {room} lights on"),
        held_out=("it's too dark in the {room}", "light up the {room} for me",
                  "give me some light in the {room}", "I can't see a thing, lights please")),
    "turn_off_light": Pool(
        train=("turn off the {room} lights", "turn off the lights in the {room}",
               "switch off the {room} light", "lights off in the {room}",
               "can you turn the {room} lights off?", "turn the lights off",
               "switch the light off in the {room}", "please turn off the {room} lamp",
               "I don't need the lights on in the {room}", "hey, turn off the light",
               "could you switch off the lights in the {room} please?",
               "shut off the {room} lights", "kill the lights in the {room}"),
        held_out=("make it dark in the {room}", "the {room} lights can go off now",
                  "lights out", "cut the {room} lights, I'm going to bed")),
    "set_brightness": Pool(
        train=("set the {room} lights to {level}", "dim the {room} lights to {level}",
               "set the brightness to {level}", "change the {room} light brightness to {level}",
               "brightness {level} in the {room}", "can you dim the lights to {level}?",
               "put the lights in the {room} at {level}", "turn the {room} lights down to {level}",
               "turn the brightness up to {level}", "make the lights {level} brightness",
               "set the {room} lamp to {level} brightness", "I want the {room} lights at {level}"),
        held_out=("could the {room} be a bit brighter, like {level}?",
                  "{level} on the {room} lights",
                  "lower the lighting in the {room} until it's at {level}",
                  "adjust how bright the {room} is to {level}")),
    "set_alarm": Pool(
        train=("set an alarm for {time}", "wake me up at {time}", "alarm for {time}",
               "set my alarm for {time}", "can you set an alarm at {time}?",
               "I need an alarm at {time}", "please wake me at {time}",
               "create an alarm for {time}", "set an alarm", "hey, set the alarm to {time}",
               "make an alarm for {time} please", "I want to get up at {time}"),
        held_out=("I have to be up by {time}, make sure I am", "get me out of bed at {time}",
                  "{time}, that's when I want my alarm to go off",
                  "don't let me sleep past {time}")),
    "cancel_alarm": Pool(
        train=("cancel my alarm", "cancel the alarm for {time}", "delete my {time} alarm",
               "turn off my alarm for {time}", "remove the {time} alarm",
               "I don't need the alarm at {time} anymore", "cancel all my alarms",
               "delete the alarm", "can you cancel my {time} alarm?",
               "get rid of the alarm at {time}", "please turn off all alarms",
               "stop the {time} alarm from going off"),
        held_out=("don't wake me up at {time}", "forget about the wake up call at {time}",
                  "the {time} alarm isn't needed, scrap it",
                  "I'm sleeping in, so skip the alarm")),
    "set_timer": Pool(
        train=("set a timer for {duration}", "timer for {duration}",
               "can you set a timer for {duration}?", "count down {duration}",
               "I need a timer for {duration}", "put a timer on for {duration}",
               "start the timer for {duration}", "hey, timer {duration}",
               "time {duration} for me", "set the kitchen timer for {duration}",
               "start a countdown for {duration}", "please set a timer for {duration}"),
        held_out=("let me know when {duration} is up", "I'm boiling eggs, give me {duration}",
                  "{duration} on the clock starting now", "beep at me after {duration}")),
    "play_music": Pool(
        train=("play {artist}", "play some {genre}", "put on some {genre} music",
               "play music by {artist}", "I want to listen to {artist}",
               "can you play some {genre}?", "play songs by {artist}", "shuffle {artist}",
               "start playing {genre} music", "play the latest album by {artist}",
               "let's hear some {genre}", "play my {genre} playlist",
               "play something by {artist} please"),
        held_out=("I'm in the mood for {genre}", "could I get a bit of {artist} going?",
                  "{artist}, any song, go", "music time, something {genre}",
                  "throw on a few {artist} tracks")),
    "pause_music": Pool(
        train=("pause the music", "pause", "stop the music", "pause this song", "stop playing",
               "can you pause the song?", "hold the music", "pause playback",
               "stop the song please", "hey, pause it", "turn the music off", "stop music"),
        held_out=("enough music for now", "hit pause on whatever's playing",
                  "can we have some silence, cut the music", "freeze the track right there")),
    "volume_up": Pool(
        train=("turn it up", "volume up", "turn up the volume", "make it louder",
               "louder please", "can you turn the volume up?", "increase the volume",
               "raise the volume", "I can't hear it, turn it up", "pump up the volume",
               "turn the music up", "a bit louder"),
        held_out=("it's too quiet", "crank it", "boost the sound a little",
                  "bring the audio level higher")),
    "volume_down": Pool(
        train=("turn it down", "volume down", "turn down the volume", "make it quieter",
               "quieter please", "can you turn the volume down?", "decrease the volume",
               "lower the volume", "it's too loud, turn it down", "turn the music down",
               "a bit quieter", "reduce the volume"),
        held_out=("that's way too loud", "bring the sound level lower", "shh, softer",
                  "my ears hurt, less noise please")),
    "call_contact": Pool(
        train=("call {contact}", "call {contact} please", "phone {contact}",
               "give {contact} a call", "can you call {contact}?", "dial {contact}",
               "I want to call {contact}", "ring {contact}", "make a call to {contact}",
               "start a call with {contact}", "hey, call {contact} on speaker",
               "video call {contact}"),
        held_out=("get {contact} on the line", "I need to talk to {contact} right now",
                  "could you connect me with {contact}?", "{contact}, ring them for me")),
    "send_message": Pool(
        train=("text {contact} {message}", "send a message to {contact} saying {message}",
               "text {contact} saying {message}", "tell {contact} {message}",
               "message {contact} that {message}", "send {contact} a text: {message}",
               "can you text {contact} and say {message}?", "write to {contact}, {message}",
               "send a text to {contact} that says {message}", "let {contact} know {message}",
               "shoot {contact} a message saying {message}", "send a message to {contact}",
               "reply to {contact} with {message}"),
        held_out=("{contact} needs to hear from me: {message}, send that",
                  "drop a quick note to {contact}, it should say {message}",
                  "I want {contact} to get a text with the words {message}",
                  "compose an SMS for {contact} reading {message}")),
    "weather_query": Pool(
        train=("what's the weather in {city}?", "what's the weather like {date}?",
               "weather in {city} {date}", "will it rain {date}?", "how hot is it in {city}?",
               "what's the forecast for {city} {date}?",
               "is it going to be sunny in {city} {date}?", "do I need an umbrella {date}?",
               "what's the temperature in {city} right now?", "tell me the weather",
               "how cold will it be {date}?", "weather forecast for {city}",
               "is it snowing in {city}?"),
        held_out=("should I bring a jacket to {city} {date}?", "{city} {date}, rain or shine?",
                  "what are the skies going to do over {city} {date}?",
                  "give me the outlook for {date} in {city}")),
    "set_temperature": Pool(
        train=("set the temperature to {temperature}", "set the thermostat to {temperature}",
               "make it {temperature} in the {room}", "turn the heat up to {temperature}",
               "change the {room} temperature to {temperature}",
               "can you set the heating to {temperature}?", "I want the {room} at {temperature}",
               "heat the {room} to {temperature}", "cool the house down to {temperature}",
               "thermostat {temperature}", "set the {room} thermostat to {temperature} please",
               "put the AC on {temperature}"),
        held_out=("it's freezing, warm the {room} up to {temperature}",
                  "{temperature} would be comfortable for the {room}",
                  "could the {room} climate be {temperature}?",
                  "adjust the heating so the {room} reaches {temperature}")),
    "navigate_to": Pool(
        train=("navigate to {place}", "take me to {place}", "directions to {place}",
               "how do I get to {place}?", "start navigation to {place}",
               "get me directions to {place}", "drive to {place}",
               "find the fastest route to {place}", "can you take me to {place}?",
               "show me the way to {place}", "let's go to {place}", "I need to get to {place}"),
        held_out=("what's the quickest way from here over to {place}?",
                  "{place} is where I'm heading, show the map", "plot a course for {place}",
                  "I'm driving over to {place}, route please")),
    "add_to_list": Pool(
        train=("add {item} to my {list} list", "put {item} on the {list} list",
               "add {item} to the list", "can you add {item} to my {list} list?",
               "put {item} on my list", "I need to buy {item}, add it to the {list} list",
               "add {item}", "remember to get {item}, put it on the {list} list",
               "{list} list, add {item}", "we're out of {item}, add it to the list",
               "stick {item} on the {list} list", "include {item} in my {list} list"),
        held_out=("jot down {item} under {list}", "my {list} list is missing {item}",
                  "don't let me forget {item} when I'm at the store",
                  "could {item} go onto the {list} list?")),
}

# slot -> the words that fill it, as people say them (times and numbers both spelled out and
# in digits, as Whisper writes either).
VALUES: dict[str, Pool] = {
    "room": Pool(
        train=("kitchen", "living room", "bedroom", "bathroom", "hallway", "office",
               "dining room", "garage", "kids' room", "attic"),
        held_out=("nursery", "guest room", "basement", "patio", "laundry room")),
    "level": Pool(
        train=("50 percent", "thirty percent", "ten percent", "75 percent", "twenty percent",
               "80 percent", "forty percent", "100 percent", "5 percent", "seventy percent"),
        held_out=("sixty percent", "35 percent", "ninety percent", "15 percent",
                  "twenty five percent")),
    "time": Pool(
        train=("seven am", "7:30 am", "six thirty", "6 am", "eight fifteen in the morning",
               "noon", "9 pm", "ten o'clock", "5:45 am", "half past six", "midnight",
               "eight pm"),
        held_out=("quarter to seven", "6:15 am", "five forty five", "eleven pm",
                  "4:30 in the morning")),
    "duration": Pool(
        train=("ten minutes", "5 minutes", "one hour", "thirty seconds", "two hours",
               "twenty minutes", "45 minutes", "fifteen minutes", "three minutes",
               "one and a half minutes"),
        held_out=("twelve minutes", "90 seconds", "one and a half hours", "seven minutes",
                  "25 minutes")),
    "artist": Pool(
        train=("Taylor Swift", "the Beatles", "Adele", "Drake", "Coldplay", "Queen",
               "Ed Sheeran", "Beyonce", "Miles Davis", "Bob Marley", "Billie Eilish",
               "Kendrick Lamar"),
        held_out=("Fleetwood Mac", "Norah Jones", "Bruno Mars", "Radiohead", "Dolly Parton")),
    "genre": Pool(
        train=("jazz", "rock", "classical", "hip hop", "country", "lo-fi", "pop", "blues",
               "reggae", "metal"),
        held_out=("bossa nova", "techno", "gospel", "folk", "funk")),
    "contact": Pool(
        train=("Mom", "Dad", "Sarah", "John", "Emily", "David", "Grandma", "Michael",
               "Jessica", "Alex", "Doctor Patel", "Chris"),
        held_out=("Olivia", "Uncle Ben", "Priya", "Marcus", "Aunt Linda")),
    "message": Pool(
        train=("I'm running late", "see you at six", "call me back when you can",
               "dinner is ready", "I'll be home soon", "happy birthday",
               "don't forget the keys", "on my way", "can you pick up the kids",
               "the meeting moved to three", "love you"),
        held_out=("I'm stuck in traffic", "thanks for lunch", "good luck with the exam",
                  "let's meet at the station", "the package arrived")),
    "city": Pool(
        train=("Paris", "London", "Tokyo", "New York", "Chicago", "Berlin", "Madrid",
               "Seattle", "Toronto", "Sydney", "Boston", "Rome"),
        held_out=("Lisbon", "Nairobi", "Denver", "Osaka", "Buenos Aires")),
    "date": Pool(
        train=("today", "tomorrow", "tonight", "this weekend", "next week", "this afternoon",
               "tomorrow morning", "Monday", "Saturday"),
        held_out=("the day after tomorrow", "this evening", "Thursday", "next weekend")),
    "temperature": Pool(
        train=("21 degrees", "seventy two degrees", "20 degrees", "sixty eight degrees",
               "22 degrees", "seventy degrees", "19 degrees", "eighteen degrees",
               "75 degrees", "twenty three degrees"),
        held_out=("sixty five degrees", "24 degrees", "seventy four degrees", "17 degrees",
                  "twenty five degrees")),
    "place": Pool(
        train=("the airport", "work", "the nearest gas station", "the train station",
               "Central Park", "the closest pharmacy", "the office", "the mall",
               "grandma's house", "the beach", "the zoo"),
        held_out=("the stadium", "the nearest hospital", "the public library", "Union Square",
                  "the ferry terminal")),
    "item": Pool(
        train=("milk", "eggs", "bread", "bananas", "coffee", "paper towels", "dish soap",
               "apples", "batteries", "toothpaste", "sunscreen", "chicken"),
        held_out=("olive oil", "yogurt", "light bulbs", "rice", "dog food")),
    "list": Pool(
        train=("shopping", "grocery", "to do", "packing", "hardware store", "party"),
        held_out=("camping", "Christmas", "moving")),
}
