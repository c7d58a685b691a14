"""qdiag's own small probe set: used, with a warning, when no copy of ParaRel can be found or
fetched. Facts are written here by hand in ParaRel's shape (relation id, templates, subject,
object); templates end with the object so it is predicted next.
"""

from __future__ import annotations

_CAPITALS = """France:Paris Germany:Berlin Italy:Rome Spain:Madrid Portugal:Lisbon Greece:Athens Poland:Warsaw
Austria:Vienna Hungary:Budapest Sweden:Stockholm Norway:Oslo Finland:Helsinki Denmark:Copenhagen Ireland:Dublin
Russia:Moscow Ukraine:Kyiv Egypt:Cairo Kenya:Nairobi Japan:Tokyo China:Beijing Thailand:Bangkok Vietnam:Hanoi
Indonesia:Jakarta Philippines:Manila Iran:Tehran Iraq:Baghdad Syria:Damascus Lebanon:Beirut Cuba:Havana Peru:Lima
Chile:Santiago Argentina:Buenos_Aires Colombia:Bogota Venezuela:Caracas Mexico:Mexico_City Canada:Ottawa
Australia:Canberra Belgium:Brussels Netherlands:Amsterdam Czech_Republic:Prague Romania:Bucharest Bulgaria:Sofia
Serbia:Belgrade Croatia:Zagreb Afghanistan:Kabul Pakistan:Islamabad India:New_Delhi Nepal:Kathmandu
South_Korea:Seoul North_Korea:Pyongyang Saudi_Arabia:Riyadh Turkey:Ankara Ethiopia:Addis_Ababa Nigeria:Abuja
Ghana:Accra Morocco:Rabat Algeria:Algiers Tunisia:Tunis Senegal:Dakar Uganda:Kampala"""

_CONTINENT = {
    "Europe": "France Germany Italy Spain Portugal Greece Poland Austria Hungary Sweden Norway Finland Denmark "
    "Ireland Ukraine Belgium Netherlands Czech_Republic Romania Bulgaria Serbia Croatia",
    "Asia": "Japan China Thailand Vietnam Indonesia Philippines Iran Iraq Syria Lebanon Afghanistan Pakistan India "
    "Nepal South_Korea North_Korea Saudi_Arabia Mongolia Bangladesh Malaysia",
    "Africa": "Egypt Kenya Ethiopia Nigeria Ghana Morocco Algeria Tunisia Senegal Uganda Sudan Angola Zambia",
    "South America": "Peru Chile Argentina Colombia Venezuela Brazil Bolivia Uruguay Paraguay Ecuador",
    "North America": "Cuba Mexico Canada Guatemala Honduras Jamaica Panama",
}

_LANGUAGES = """France:French Germany:German Italy:Italian Spain:Spanish Portugal:Portuguese Greece:Greek
Poland:Polish Hungary:Hungarian Sweden:Swedish Norway:Norwegian Finland:Finnish Denmark:Danish Russia:Russian
Ukraine:Ukrainian Japan:Japanese China:Chinese Thailand:Thai Vietnam:Vietnamese Indonesia:Indonesian Iran:Persian
Turkey:Turkish Mexico:Spanish Argentina:Spanish Peru:Spanish Chile:Spanish Colombia:Spanish Cuba:Spanish
Brazil:Portuguese Egypt:Arabic Saudi_Arabia:Arabic Iraq:Arabic Syria:Arabic Morocco:Arabic Austria:German
Netherlands:Dutch Czech_Republic:Czech Romania:Romanian Bulgaria:Bulgarian Serbia:Serbian Croatia:Croatian
South_Korea:Korean North_Korea:Korean Israel:Hebrew Pakistan:Urdu Bangladesh:Bengali"""

_CITIES = """Lyon:France Marseille:France Toulouse:France Munich:Germany Hamburg:Germany Cologne:Germany
Milan:Italy Naples:Italy Florence:Italy Barcelona:Spain Seville:Spain Valencia:Spain Porto:Portugal Krakow:Poland
Osaka:Japan Kyoto:Japan Shanghai:China Shenzhen:China Mumbai:India Kolkata:India Karachi:Pakistan
Istanbul:Turkey Toronto:Canada Vancouver:Canada Montreal:Canada Sydney:Australia Melbourne:Australia
Rio_de_Janeiro:Brazil Sao_Paulo:Brazil Alexandria:Egypt Casablanca:Morocco Lagos:Nigeria
Johannesburg:South_Africa Gothenburg:Sweden Rotterdam:Netherlands Antwerp:Belgium Geneva:Switzerland
Zurich:Switzerland Salzburg:Austria Busan:South_Korea"""

TEMPLATES: dict[str, list[str]] = {
    "P36": ["The capital of [X] is [Y].", "The capital city of [X] is [Y].", "[X]'s capital is [Y].",
            "[X]'s capital city is [Y].", "The seat of government of [X] is [Y]."],
    "P30": ["[X] is located in [Y].", "[X] is a country in [Y].", "[X] is part of the continent of [Y].",
            "[X] belongs to the continent of [Y]."],
    "P37": ["The official language of [X] is [Y].", "The language spoken in [X] is [Y].",
            "In [X], the official language is [Y].", "[X]'s official language is [Y]."],
    "P17": ["[X] is located in [Y].", "[X] is a city in [Y].", "[X] is in the country of [Y].",
            "The city of [X] is in [Y]."],
}


def _pairs(text: str) -> list[tuple[str, str]]:
    out = []
    for item in text.split():
        sub, obj = item.split(":")
        out.append((sub.replace("_", " "), obj.replace("_", " ")))
    return out


def probe_facts() -> dict[str, list[tuple[str, str]]]:
    """``{relation: [(subject, object), ...]}`` for the probe set."""
    continent = [(c.replace("_", " "), cont) for cont, cs in _CONTINENT.items() for c in cs.split()]
    return {"P36": _pairs(_CAPITALS), "P30": continent, "P37": _pairs(_LANGUAGES), "P17": _pairs(_CITIES)}
