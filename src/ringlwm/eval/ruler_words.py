"""Word lists for the RULER-style tasks. RULER draws its words from the ``wonderwords`` package (adjective
and noun lists for the "words" keys of the needle tasks, "{adjective}-{noun}"; nouns, adjectives and verbs
for the common-words task) and, past those, a downloaded ``english_words.json``. ``word_lists`` reads
wonderwords' own files when it is installed (a dependency of ringlwm), then the ``english_words`` package's
list where installed; otherwise ringlwm's own lists below, and past any of them made-up words of two
syllables (``pseudo_words``), enough for any context length. The results record which.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

ADJECTIVES = tuple("""
able absent acid active actual adorable afraid agile alert alive amber ample ancient angry annual anxious
aquatic arctic arid aromatic artistic ashen attentive autumnal average awake aware awkward bald bashful
better bitter black bland blank blissful blond blue blunt bold bony boring bouncy brave breezy brief bright
brisk broad broken bronze brown bubbly bumpy busy calm candid capable careful careless casual cautious
cheap cheerful chilly chubby civil classic clean clever cloudy clumsy coastal cold colossal common complex
cosmic cozy crafty creamy crimson crisp crooked crowded cruel crunchy cuddly curious curly damp dapper dark
dazzling dear decent deep delicate dense devout dim direct dizzy dry dull dusty eager early earnest easy
elastic elder electric elegant empty endless equal even exact exotic faded faint fair faithful famous fancy
fast fearless feeble fertile fierce filthy fine firm flat fluffy fond foolish formal fragile frail frank
free fresh friendly frosty frozen funny fuzzy gentle giant gifted glad gleaming glossy golden graceful grand
grateful gray great greedy green grim grumpy guilty hairy handy happy hardy harsh hasty hearty heavy hidden
high hollow honest hopeful huge humble hungry icy idle immense innocent inner itchy jolly joyful juicy keen
kind lanky large late lavish lazy lean lively lofty lonely long loose loud lovely loyal lucky lumpy lush
magic majestic mellow merry messy mighty mild misty modern modest moist muddy murky narrow nasty native
neat nervous nimble noble noisy normal nutty obedient odd olive orange ornate pale patient peaceful perfect
petite plain pleasant plump polite poor precious pretty prickly proud purple quaint quick quiet radiant rapid
rare raw ready regal rich rigid ripe rocky rosy rough round royal rugged rusty sacred salty sandy savage
scarlet scenic secret serene shabby shaggy shallow sharp shiny short shy silent silky silver simple sleek
sleepy slender slim slow small smart smooth snowy soft solar solemn solid somber sour sparkling spicy
splendid spotless spry square stable stark steady steep sticky stiff stormy strange strict striped strong
sturdy subtle sudden sunny super sweet swift tall tame tangy tart tender tense thick thin thirsty tidy tiny
tired tough tranquil tricky true twin ugly unique upbeat urban useful vacant vague vast velvet vibrant
violet vivid warm wary weary wet whole wicked wide wild windy wise witty wooden woolly worried young zany
zealous
""".split())

NOUNS = tuple("""
acorn actor airport album alley anchor angle animal ankle answer apple apron arch arena arm army arrow
artist attic aunt author avenue badge bag bakery ball balloon banana band bank barn barrel basket bat bath
battery beach beacon beak bean bear beard bed bee beetle bell belt bench berry bicycle bird blanket blossom
boat body bone book boot bottle boulder bowl box branch bread brick bridge broom brush bubble bucket buffalo
bulb bundle bush butter button cabin cable cactus cake camel camera camp canal candle cannon canoe canyon
cap captain car card carpet carrot cart castle cat cave cellar chair chalk channel chapel cheese cherry chest
chicken chimney church circle city clock cloud clover coast coat coffee coin collar comet compass cookie
copper coral corn cottage cotton couch country cousin cow crab crane crayon creek cricket crow crown crystal
cup curtain cushion daisy dancer deer desert desk diamond dinner dog doll dolphin donkey door dragon drawer
dream dress drum duck eagle ear earth egg elbow elephant engine falcon farm feather fence ferry field finger
fire fish flag flame flask flower flute fog forest fork fountain fox frog fruit galaxy garden gate gem
ghost giraffe glacier glass glove goat gold goose grape grass guitar hammer harbor harp hat hawk heart hill
hive hook horizon horn horse hotel house island ivory jacket jar jelly jewel kettle key kitchen kite kitten
knee knife ladder lake lamp lantern leaf lemon letter library lily lion lizard lobster lock log magnet
mango map marble market meadow melon mirror mitten monkey moon moose mountain mouse mule museum needle nest
net night novel oak ocean office olive onion orchard otter owl oyster paddle page paint palace panda paper
parrot path peach peanut pear pearl pebble pencil penguin pepper piano pickle pigeon pillow pilot pine pipe
planet plate plum pocket poem pond pony potato pottery pumpkin puppy puzzle quarry queen quill rabbit
raccoon radio rain rainbow raven ribbon ring river road robin rock rocket roof room rose saddle sail salmon
sand scarf school scissors sea seal seed shadow shark sheep shell ship shoe shovel sister skate sky sled
snail snake soap sock sofa soup spider sponge spoon spring squirrel stable stage star statue stone storm
stove straw stream street sugar suitcase summit sun swan sweater table tail teapot temple tent thread
throne thunder tiger timber toast tomato tooth torch tower town toy tractor train tree trumpet tulip tunnel
turtle umbrella valley vase violin volcano wagon wall walrus wand water wave whale wheel whistle willow
window wing winter wizard wolf wool yacht yard zebra
""".split())

VERBS = tuple("""
accept add admire agree allow answer appear argue arrive ask bake balance bathe beg behave belong bless
blink boil borrow bounce breathe brush build bury calculate call carry carve catch chase cheer chew clap
climb collect comb count crawl cross cry dance dare deliver describe dig discover dive drag draw dream drift
drink drive dust earn enjoy escape explain explore fasten fetch fill find fix float flow fly fold follow
gather giggle glide glow grab greet grin grow guard guess hammer hang harvest heal help hide hop hum hunt
hurry imagine invent iron jog join juggle jump kick kneel knit knock laugh launch lead lean learn lift
listen march measure melt mend mix nod notice obey offer open order pack paddle paint pass pause peel pick
plant play polish pour pray print pull push race rain reach read relax remember repair rescue rest ride
ring roar row rush sail scatter scrub search shake shine shout sing sip skip sleep slide smile sneeze sniff
solve sort sparkle spell spin splash sprint squeeze stack stir stretch swim swing talk taste teach throw
tickle travel trust tumble twist type unlock visit wait walk wander wash watch wave weave whisper whistle
wink wish wonder work wrap write yawn yell zoom
""".split())

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gl", "pl", "st",
           "tr")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "n", "r", "l", "s")


def pseudo_words() -> list[str]:
    """Made-up words (``"bantor"``, ``"glimes"``): every pair of onset-vowel-coda syllables, in a fixed
    order, minus the real words above. 500 syllables give about 250,000 words: enough distinct words for
    the common-words task at any context length a model reaches (about 4 tokens a word at 1M tokens)."""
    syllables = [o + v + c for o in _ONSETS for v in _VOWELS for c in _CODAS]
    real = set(ADJECTIVES) | set(NOUNS) | set(VERBS)
    return [a + b for a in syllables for b in syllables if a + b not in real]


@dataclass(frozen=True)
class WordLists:
    adjectives: tuple
    nouns: tuple
    verbs: tuple
    extra: tuple = field(default=())  # more real words for cwe past these (english_words), before made-up ones
    source: str = "ringlwm"

    def common_words(self) -> list[str]:
        """The common-words task's real words (RULER: nouns + adjectives + verbs, distinct, sorted)."""
        return sorted(set(self.nouns) | set(self.adjectives) | set(self.verbs))


WORD_SOURCES = ("auto", "wonderwords", "ringlwm")


def _wonderwords(name: str) -> tuple:
    from importlib.resources import files

    text = (files("wonderwords") / "assets" / name).read_text(encoding="utf-8")
    return tuple(dict.fromkeys(w.strip() for w in text.splitlines() if w.strip()))


def _english_words(known: set) -> tuple:
    try:
        from english_words import get_english_words_set
    except ImportError:
        return ()
    return tuple(sorted(w for w in get_english_words_set(["web2"], lower=True, alpha=True) if w not in known))


def word_lists(source: str = "auto") -> WordLists:
    """RULER's word lists from wonderwords ("wonderwords"; "auto": when installed), or ringlwm's own
    ("ringlwm"; "auto" without wonderwords). Read once per process and source (``_read_word_lists``)."""
    import importlib.util

    return _read_word_lists(source, importlib.util.find_spec("wonderwords") is not None)


@functools.cache
def _read_word_lists(source: str, have: bool) -> WordLists:
    if source not in WORD_SOURCES:
        raise ValueError(f"unknown word source {source!r}: choose one of {', '.join(WORD_SOURCES)}")
    if source == "wonderwords" and not have:
        raise ValueError("the wonderwords package is not installed: pip install wonderwords (RULER's word lists), "
                         "or use ringlwm's own lists (words='ringlwm')")
    if source == "ringlwm" or not have:
        return WordLists(ADJECTIVES, NOUNS, VERBS, source="ringlwm")
    import wonderwords

    adjectives, nouns, verbs = (_wonderwords(f"{kind}list.txt") for kind in ("adjective", "noun", "verb"))
    lists = WordLists(adjectives, nouns, verbs, source=f"wonderwords {wonderwords.__version__}")
    extra = _english_words(set(lists.common_words()))
    if extra:
        lists = WordLists(adjectives, nouns, verbs, extra, source=lists.source + " + english_words")
    return lists


def _check() -> None:
    for name, words in (("ADJECTIVES", ADJECTIVES), ("NOUNS", NOUNS), ("VERBS", VERBS)):
        if len(set(words)) != len(words) or not all(w.isalpha() and w.islower() for w in words):
            raise AssertionError(f"{name} must be distinct lowercase words")


_check()
