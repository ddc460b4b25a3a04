"""Cloze templates for the 33 Wikidata relations of ``known_1000.json``.

Each relation has several phrasings ending where the object goes (``{}`` = subject); the first
few come from the phrasings in ``known_1000.json`` and MQuAKE's cloze templates, the rest are ours.
Paraphrase prompts of a CounterFact-style record use templates other than the edit prompt's.
``gen`` are open prompts about the subject for generation (fluency, consistency).
"""

from __future__ import annotations

RELATIONS: dict[str, dict] = {
    "P101": {
        "name": "field of work",
        "cloze": [
            "{} works in the field of",
            "{}'s domain of work is",
            "{} works in the area of",
            "The expertise of {} is in the field of",
        ],
        "gen": ["{} is known for work in"],
    },
    "P103": {
        "name": "native language",
        "cloze": [
            "The native language of {} is",
            "The mother tongue of {} is",
            "{} is a native speaker of",
            "{} grew up speaking the language",
        ],
        "gen": ["{} was raised speaking"],
    },
    "P106": {
        "name": "occupation",
        "cloze": [
            "{} works as a",
            "The occupation of {} is",
            "{}'s profession is a",
            "By profession, {} is a",
        ],
        "gen": ["{} is best known as"],
    },
    "P108": {
        "name": "employer",
        "cloze": ["{} is employed by", "{} works for", "The employer of {} is", "{} is on the payroll of"],
        "gen": ["{} spent years working at"],
    },
    "P127": {
        "name": "owned by",
        "cloze": ["{} is owned by", "The owner of {} is", "{} belongs to", "{} is a property of"],
        "gen": ["{} is run by"],
    },
    "P1303": {
        "name": "instrument",
        "cloze": [
            "{} plays the",
            "The instrument played by {} is the",
            "{} performs on the",
            "{} is a musician who plays the",
        ],
        "gen": ["{} is famous for playing"],
    },
    "P131": {
        "name": "located in the administrative territorial entity",
        "cloze": ["{} is located in", "{} can be found in", "The location of {} is", "{} lies in"],
        "gen": ["{} is a place in"],
    },
    "P136": {
        "name": "genre",
        "cloze": [
            "The genre played by {} is",
            "{} is known for performing",
            "The musical genre of {} is",
            "{} plays music in the genre of",
        ],
        "gen": ["{} makes music that"],
    },
    "P138": {
        "name": "named after",
        "cloze": [
            "{} is named after",
            "{}, which was named after",
            "{} was called after",
            "The name of {} comes from",
        ],
        "gen": ["{} got its name from"],
    },
    "P140": {
        "name": "religion",
        "cloze": [
            "{} follows the religion of",
            "{} is affiliated with the religion",
            "The religion of {} is",
            "{} practises",
        ],
        "gen": ["{} worships"],
    },
    "P1412": {
        "name": "languages spoken, written or signed",
        "cloze": [
            "The language used by {} is",
            "{} speaks the language",
            "{} writes in",
            "{} communicates in",
        ],
        "gen": ["{} usually speaks"],
    },
    "P159": {
        "name": "headquarters location",
        "cloze": [
            "The headquarters of {} is in",
            "{} is headquartered in",
            "{}'s headquarters are in",
            "The main office of {} is located in",
        ],
        "gen": ["{} has its offices in"],
    },
    "P17": {
        "name": "country",
        "cloze": [
            "{} is located in the country of",
            "{} is in the country of",
            "The country of {} is",
            "{} lies in the country of",
        ],
        "gen": ["{} is a landmark of"],
    },
    "P176": {
        "name": "manufacturer",
        "cloze": ["{} is produced by", "{} is manufactured by", "The manufacturer of {} is", "{} is made by"],
        "gen": ["{} comes from the factories of"],
    },
    "P178": {
        "name": "developer",
        "cloze": [
            "{} is developed by",
            "{} was created by",
            "The developer of {} is",
            "{}, a product developed by",
        ],
        "gen": ["{} was designed by engineers at"],
    },
    "P19": {
        "name": "place of birth",
        "cloze": [
            "{} was born in",
            "The birthplace of {} is",
            "{} is originally from",
            "{} came into the world in",
        ],
        "gen": ["{} spent childhood in"],
    },
    "P190": {
        "name": "twinned administrative body",
        "cloze": [
            "{} is a twin city of",
            "The twin city of {} is",
            "{} is twinned with",
            "{} has a sister city,",
        ],
        "gen": ["{} has close ties with"],
    },
    "P20": {
        "name": "place of death",
        "cloze": [
            "{} died in the city of",
            "{} passed away in",
            "The place of death of {} is",
            "{} spent the last days of life in",
        ],
        "gen": ["{} is buried near"],
    },
    "P27": {
        "name": "country of citizenship",
        "cloze": [
            "{} is a citizen of",
            "{} holds a citizenship of",
            "The nationality of {} is",
            "{} has the citizenship of",
        ],
        "gen": ["{} carries a passport of"],
    },
    "P276": {
        "name": "location",
        "cloze": ["The location of {} is", "{} is located in", "{} is in", "{} takes place in"],
        "gen": ["{} can be visited in"],
    },
    "P30": {
        "name": "continent",
        "cloze": [
            "{} is located in the continent of",
            "{} belongs to the continent of",
            "{} is a part of the continent of",
            "The continent of {} is",
        ],
        "gen": ["{} is a place on the continent"],
    },
    "P36": {
        "name": "capital",
        "cloze": [
            "The capital of {} is",
            "The capital city of {} is",
            "{}'s capital is",
            "The seat of government of {} is",
        ],
        "gen": ["The largest city of {} is"],
    },
    "P364": {
        "name": "original language of film or TV show",
        "cloze": [
            "The original language of {} is",
            "The language of {} is",
            "{} was originally made in the language",
            "{} was filmed in the language",
        ],
        "gen": ["{} is a film in"],
    },
    "P37": {
        "name": "official language",
        "cloze": [
            "The official language of {} is",
            "In {}, the language spoken is",
            "In {}, people speak",
            "The language of {} is",
        ],
        "gen": ["People in {} talk in"],
    },
    "P39": {
        "name": "position held",
        "cloze": [
            "{} holds the position of",
            "{} has the position of",
            "{} served as",
            "The position of {} is",
        ],
        "gen": ["{} was appointed"],
    },
    "P407": {
        "name": "language of work or name",
        "cloze": [
            "{} is written in",
            "The language of {} is",
            "{} was written in the language",
            "The text of {} is in",
        ],
        "gen": ["{} was published in"],
    },
    "P413": {
        "name": "position played on team / speciality",
        "cloze": [
            "{} plays in the position of",
            "{} plays as",
            "The position of {} on the team is",
            "On the field, {} plays",
        ],
        "gen": ["{} is a player who"],
    },
    "P449": {
        "name": "original broadcaster",
        "cloze": [
            "{} premiered on",
            "{} was originally aired on",
            "{} debuted on",
            "The original network of {} is",
        ],
        "gen": ["{} was first shown on"],
    },
    "P463": {
        "name": "member of",
        "cloze": [
            "{} is a member of the",
            "{} is affiliated with the",
            "{} belongs to the",
            "{} is part of the",
        ],
        "gen": ["{} joined"],
    },
    "P495": {
        "name": "country of origin",
        "cloze": [
            "{} was created in the country of",
            "{} originated in",
            "The country of origin of {} is",
            "{} comes from the country of",
        ],
        "gen": ["{} first appeared in"],
    },
    "P641": {
        "name": "sport",
        "cloze": [
            "{} professionally plays the sport of",
            "{} plays the sport of",
            "The sport played by {} is",
            "{} is a professional player of",
        ],
        "gen": ["{} trains every day for"],
    },
    "P740": {
        "name": "location of formation",
        "cloze": [
            "{} was formed in",
            "{} was founded in",
            "{} started in",
            "The place where {} was formed is",
        ],
        "gen": ["{} began playing together in"],
    },
    "P937": {
        "name": "work location",
        "cloze": [
            "{} worked in the city of",
            "{} took up work in",
            "The work location of {} is",
            "{} was employed in the city of",
        ],
        "gen": ["{} had an office in"],
    },
}


def templates(relation_id: str) -> list[str]:
    try:
        return RELATIONS[relation_id]["cloze"]
    except KeyError:
        raise KeyError(f"no templates for relation {relation_id}; known: {sorted(RELATIONS)}") from None


#: A vague, true-for-any-subject answer per relation: ReLearn's positive target for a forgotten fact
#: (the answer stays fluent and on-topic but names no entity; ``loka.methods.train.relearn_answer``).
VAGUE: dict[str, str] = {
    "P101": "a field of research",
    "P103": "a language",
    "P106": "a profession",
    "P108": "an organisation",
    "P127": "a company",
    "P1303": "a musical instrument",
    "P131": "a region",
    "P136": "a musical style",
    "P138": "a person or a place",
    "P140": "a faith",
    "P1412": "a language",
    "P159": "a city",
    "P17": "a country",
    "P176": "a company",
    "P178": "a company",
    "P19": "a city",
    "P190": "another city",
    "P20": "a city",
    "P27": "a country",
    "P276": "a place",
    "P30": "a continent",
    "P36": "a city",
    "P364": "a language",
    "P37": "a language",
    "P39": "an office",
    "P407": "a language",
    "P413": "a position",
    "P449": "a television network",
    "P463": "an organisation",
    "P495": "a country",
    "P641": "a sport",
    "P740": "a city",
    "P937": "a city",
}
