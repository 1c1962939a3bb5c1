"""Synthetic episodic memories of one fictional person, in the MetaHuman OS on-disk format.

The same source feeds three things: ``examples/memories/`` (the demo's input, committed),
the tiny tokenizer's training text, and tests. It lives in the package, not in ``examples/``,
so that the tokenizer never depends on files outside the wheel.

Regenerate the committed files with ``python -m mhd.devtools.examples examples/memories``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

PERSONA = "Maya"
USER_ID = "u-maya"
# Pacific daylight time: the writer files memories under the *local* date, so an evening event
# lands in a different YYYY/MM/DD folder than its UTC timestamp says. Fixed offset keeps it simple.
LOCAL_TZ = timezone(timedelta(hours=-7))

_CATEGORY = {
    "reflection": "reflections",
    "reflection_summary": "reflections",
    "dream": "dreams",
    "daydream": "dreams",
    "audio": "audio",
    "tool_invocation": "tool-invocations",
    "action": "actions",
}


@dataclass(frozen=True)
class Example:
    local: str  # "YYYY-MM-DD HH:MM:SS.f" in LOCAL_TZ
    type: str
    content: str
    response: str | None = None
    tags: tuple[str, ...] = ()
    entities: tuple[str, ...] = ()
    importance: float = 0.5
    metadata: dict[str, Any] = field(default_factory=dict)
    category: str | None = None  # override of the folder category ("curated")
    links_to: int | None = None  # index of another example (reflection_summary → reflection)
    parent: int | None = None  # index of the previous turn of the same conversation


def _c(user: str, assistant: str) -> str:
    """The newer conversation shape: both turns inside ``content``."""
    return f"User: {user}\n\nAssistant: {assistant}"


def _me(said: str) -> str:
    """The older conversation shape: the owner's words quoted, the reply in ``response``."""
    return f'Me: "{said}"'


EXAMPLES: tuple[Example, ...] = (
    # --- 2025: the oldest layout, episodic/YYYY/<file>.json, older conversation shape -----------
    Example("2025-09-03 19:42:07.3", "conversation",
            _me("I finally finished the migration to Postgres 16 at work. Took three weekends, but the "
                "replication lag is gone and nobody got paged."),
            response="That's a real win. Three weekends is a lot of your own time, though. Did anyone "
                     "notice the effort, or did it just quietly work?",
            tags=("work", "postgres"), entities=("Postgres",), importance=0.7,
            metadata={"conversationId": "conv-2025-09-03-a", "processed": True}),
    Example("2025-09-14 05:58:41.0", "conversation",
            _me("Juniper woke me up at five again. I swear she hears the garbage truck two streets "
                "before I do."),
            response="Dogs make excellent garbage-truck radar. A longer walk the evening before might "
                     "help her sleep through it.",
            tags=("juniper", "sleep"), entities=("Juniper",),
            metadata={"conversationId": "conv-2025-09-14-a", "processed": True}),
    Example("2025-09-21 18:20:15.6", "observation",
            "Walked Juniper along the river trail after work. The cottonwoods are starting to turn and "
            "someone has painted little yellow arrows on the rocks near the second bridge.",
            tags=("juniper", "walk", "river"), entities=("Juniper",)),
    Example("2025-10-02 22:10:33.9", "conversation",
            _me("I keep putting off calling Priya. It's been almost a month and I feel guilty every "
                "time I see her name on my phone."),
            response="Guilt tends to grow the longer it waits. A short message, even just 'thinking "
                     "of you, call this weekend?', could break the ice without a big conversation.",
            tags=("family", "priya"), entities=("Priya",), importance=0.8,
            metadata={"conversationId": "conv-2025-10-02-a", "processed": True}),
    Example("2025-10-19 17:30:02.2", "conversation",
            _me("Should I sign up for the Thursday Portuguese class or keep going with the app? "
                "The class is forty minutes away by bus."),
            response="If you want to actually speak before the Lisbon trip, a room full of people "
                     "will push you further than a streak counter. The bus ride could be listening "
                     "practice.",
            tags=("portuguese", "learning"), entities=("Lisbon",),
            metadata={"conversationId": "conv-2025-10-19-a", "processed": True}),
    Example("2025-10-25 07:12:48.4", "observation",
            "First frost on the garden beds this morning. The last tomatoes are split and the kale "
            "looks happier than it has all summer.",
            tags=("garden", "weather")),
    Example("2025-11-08 20:05:19.1", "conversation",
            _me("Made my grandmother's jollof for the potluck and the pot was empty in twenty "
                "minutes. Two people asked for the recipe."),
            response="That's the best review a recipe can get. Are you going to write it down for "
                     "them, or keep a little family mystery?",
            tags=("cooking", "family"), entities=("Grandma Ada",), importance=0.6,
            metadata={"conversationId": "conv-2025-11-08-a", "processed": True}),
    Example("2025-11-15 23:01:55.0", "reflection",
            "I notice that I only feel rested when a weekend has one thing in it that is just for me. "
            "Not errands, not catching up on work, but something like the river walk or baking bread. "
            "When every hour is useful, I come back on Monday more tired than I left.",
            tags=("rest", "weekends"), importance=0.7),
    Example("2025-11-27 21:48:30.7", "conversation",
            _me("Thanksgiving was loud and went on too long, but I'm glad I went. Dad told the canoe "
                "story again and this time I laughed."),
            response="Sometimes the story doesn't change but you do. It sounds like it landed "
                     "differently this year.",
            tags=("family", "holidays"), entities=("Dad",),
            metadata={"conversationId": "conv-2025-11-27-a", "processed": True}),
    Example("2025-12-05 22:40:12.8", "inner_dialogue",
            "Why do I say yes to every review request? Partly because I like being useful, partly "
            "because saying no feels like admitting I'm behind. Maybe I can try saying 'tomorrow' "
            "instead of 'now' and see if anything breaks.",
            tags=("work", "boundaries")),
    Example("2025-12-12 23:20:04.5", "conversation",
            _me("I don't want another year where I only write code for other people. I want to "
                "build one small thing that is mine."),
            response="What would the small thing be, if it had to exist by spring? Naming it makes "
                     "it much easier to protect time for it.",
            tags=("goals", "side-project"), importance=0.9,
            metadata={"conversationId": "conv-2025-12-12-a", "processed": True}),
    Example("2025-12-20 06:31:27.2", "dream",
            "I was back in the old apartment but the hallway kept getting longer, and every door "
            "opened onto the garden with snow on the tomato cages. Juniper was there, completely calm, "
            "waiting for me at the end.",
            tags=("dream", "home"), entities=("Juniper",)),
    Example("2025-12-30 10:02:44.9", "conversation",
            _me("Picked my word for next year: 'enough'. Enough sleep, enough projects, enough is "
                "enough with the doomscrolling."),
            response="'Enough' is a kind word to choose. It leaves room for rest instead of "
                     "demanding more.",
            tags=("new-year", "goals"), importance=0.8,
            metadata={"conversationId": "conv-2025-12-30-a", "processed": True}),
    # --- 2026: dated folders, newer conversation shape, categories ----------------------------
    Example("2026-01-04 09:15:36.1", "conversation",
            _c("I started the side project. It's a tiny app that tells me when the river trail is "
               "too muddy to walk Juniper.",
               "That's a lovely first project: small, useful every week, and it has a built-in "
               "tester with four legs. Where will the mud data come from?"),
            tags=("side-project", "juniper"), entities=("Juniper",), importance=0.8,
            metadata={"conversationId": "conv-2026-01-04-a", "cognitiveMode": "dual", "processed": True}),
    Example("2026-01-04 09:21:02.6", "conversation",
            _c("Probably the county's rain gauge feed plus my own notes. I don't need it to be "
               "accurate, just better than guessing.",
               "Better than guessing is a good bar. Starting with your own notes means you'll "
               "learn which signals actually matter."),
            tags=("side-project",), entities=("county rain gauge",),
            metadata={"conversationId": "conv-2026-01-04-a", "cognitiveMode": "dual"},
            parent=13),
    Example("2026-01-09 21:37:50.0", "reflection",
            "The mud app is teaching me something I didn't expect. I enjoy the code less than I "
            "enjoy writing down what the trail looked like. Maybe the notes are the project and the "
            "app is just an excuse to keep them.",
            tags=("side-project", "writing"), importance=0.7),
    Example("2026-01-10 08:05:11.4", "reflection_summary",
            "Summary of recent reflections: the side project matters less as software than as a "
            "habit of paying attention to the trail, the weather and Juniper.",
            tags=("summary", "side-project"), links_to=15),
    Example("2026-01-14 12:48:23.3", "observation",
            "Lunch at the pho place on Division with Sam from the platform team. They're moving to "
            "Denver in March and want to hand over the on-call runbook before then.",
            tags=("work", "lunch"), entities=("Sam", "Denver")),
    Example("2026-01-18 22:55:09.8", "inner_dialogue",
            "If Sam leaves, I'll be the only one who understands the replication setup. That's "
            "flattering for about a minute and then it's just a single point of failure with my "
            "name on it. I should write it down properly this month, not the week before they go.",
            tags=("work", "planning"), entities=("Sam",), importance=0.7),
    Example("2026-01-22 19:10:40.2", "conversation",
            _c("Priya called! We talked for an hour about nothing and everything. She's thinking "
               "about going back to school for nursing.",
               "An hour about nothing and everything sounds like exactly what you both needed. "
               "How do you feel about her going back to school?"),
            tags=("family", "priya"), entities=("Priya",), importance=0.8,
            metadata={"conversationId": "conv-2026-01-22-a", "processed": True}),
    Example("2026-01-22 19:14:58.7", "conversation",
            _c("Proud, mostly. A little jealous that she's brave enough to start over at 31.",
               "Jealousy that points at bravery is useful information. Is there something you'd "
               "start over on, if you let yourself?"),
            tags=("family", "feelings"), entities=("Priya",),
            metadata={"conversationId": "conv-2026-01-22-a"}, parent=19),
    Example("2026-01-29 06:44:31.5", "dream",
            "A dream where I was teaching a Portuguese class but every word I said came out as SQL. "
            "The students were very patient. Someone asked for the JOIN in the past tense.",
            tags=("dream", "portuguese"), importance=0.4),
    Example("2026-02-02 18:30:17.9", "observation",
            "The Thursday class did a role-play at a bakery. I ordered 'um pastel de nata, por "
            "favor' without looking at my notes and the teacher gave me a thumbs up.",
            tags=("portuguese", "class"), entities=("Lisbon",), importance=0.6),
    Example("2026-02-07 10:25:03.0", "conversation",
            _c("Should I take the staff engineer interview loop? My manager says I'm ready but I'm "
               "not sure I want more meetings.",
               "It might help to separate the title from the calendar. What would a good week look "
               "like in that role, and could you negotiate for it before saying yes?"),
            tags=("work", "career"), importance=0.9,
            metadata={"conversationId": "conv-2026-02-07-a", "cognitiveMode": "dual", "processed": True}),
    Example("2026-02-07 10:31:44.1", "conversation",
            _c("A good week would be two days of deep work, one day of design reviews and the rest "
               "helping people get unstuck.",
               "That's a clear picture. Bring exactly that list to your manager; it turns 'am I "
               "ready' into 'is this the job', which is the better question."),
            tags=("work", "career"), importance=0.8,
            metadata={"conversationId": "conv-2026-02-07-a", "cognitiveMode": "dual"}),
    Example("2026-02-11 23:12:36.4", "inner_dialogue",
            "I told myself I'd stop checking work chat after nine and I already broke it twice this "
            "week. The honest reason is that silence makes me imagine problems. Maybe turning "
            "notifications off is kinder than relying on willpower.",
            tags=("boundaries", "work")),
    Example("2026-02-14 16:05:28.8", "observation",
            "Juniper met a basset hound named Waffles at the dog park and they ignored every other "
            "dog for forty minutes. The owner and I traded numbers for a playdate.",
            tags=("juniper", "dog-park"), entities=("Juniper", "Waffles")),
    Example("2026-02-20 21:47:13.6", "reflection",
            "Writing the replication runbook turned out to be the most useful thing I did this "
            "quarter. Explaining it forced me to admit two parts I only half understood, and "
            "fixing those made the whole system calmer.",
            tags=("work", "documentation"), entities=("Sam",), importance=0.8),
    Example("2026-02-26 07:20:00.3", "daydream",
            "On the bus I imagined the Lisbon trip in detail: the yellow tram, a notebook, an "
            "afternoon with nothing planned except finding the best custard tart in Belém.",
            tags=("travel", "lisbon"), entities=("Lisbon", "Belém")),
    Example("2026-03-01 11:11:11.1", "summary",
            "February summary: said yes to the staff interview loop on my own terms, finished the "
            "runbook before Sam left, kept the Thursday class going and only skipped once.",
            tags=("summary", "month"), entities=("Sam",), importance=0.6),
    Example("2026-03-04 20:22:47.5", "conversation",
            _c("The interview panel asked me to design a rate limiter and I froze for a full minute "
               "before I remembered I've built two of them.",
               "Freezing and then recovering is more common than you'd think, and the recovery is "
               "what they remember. What did you end up drawing?"),
            tags=("work", "interview"), importance=0.7,
            metadata={"conversationId": "conv-2026-03-04-a", "processed": True}),
    Example("2026-03-06 22:03:19.2", "inner_dialogue",
            "Part of me wants the staff role for the recognition and part of me wants it so I can "
            "protect my team's focus time. Only the second reason survives a bad week.",
            tags=("career", "motives"), importance=0.7),
    Example("2026-03-09 13:40:05.7", "audio",
            "Voice note: remember to ask the landlord about the leaking gutter over the back steps, "
            "and buy seed potatoes before the weekend. Also call Dad about April.",
            tags=("voice-note", "errands"), entities=("Dad",),
            metadata={"source": "phone", "durationSeconds": 14}),
    Example("2026-03-12 19:55:31.0", "conversation",
            _c("I got the staff role. I'm happy, and also weirdly sad, like something ended.",
               "Both can be true. Something did end: being the person who could just go heads-down. "
               "What would help you say goodbye to that part well?"),
            tags=("career", "feelings"), importance=1.0,
            metadata={"conversationId": "conv-2026-03-12-a", "processed": True}),
    Example("2026-03-15 08:17:42.6", "reflection",
            "I keep measuring good days by how much I produced. In the new role a good day might be "
            "one where someone else shipped something because I unblocked them early. I need a "
            "new way to notice those days, or I will think I'm failing.",
            tags=("career", "values"), importance=0.9),
    Example("2026-03-16 09:00:00.0", "reflection_summary",
            "Summary of recent reflections: success in the new role is measured through other "
            "people's progress, and that needs its own small ritual of noticing.",
            tags=("summary", "career"), links_to=34),
    Example("2026-03-21 15:32:58.4", "observation",
            "Planted the seed potatoes in the back bed with Juniper supervising. She dug one up "
            "again and looked extremely proud of it.",
            tags=("garden", "juniper"), entities=("Juniper",)),
    Example("2026-03-24 05:49:10.9", "dream",
            "Dreamt the river had moved into the office. Everyone kept working at their desks with "
            "their feet in the water and nobody mentioned it. I was the only one who brought boots.",
            tags=("dream", "work"), importance=0.4),
    Example("2026-03-28 18:44:26.3", "conversation",
            _c("Can you help me plan the week in Lisbon? I want one museum, one day trip and lots "
               "of walking.",
               "Sure. A calm shape could be: day one wander Alfama, day two the tile museum, day "
               "three Sintra by train, then leave the rest open for walking and cafés. Want it "
               "lighter or fuller?"),
            tags=("travel", "lisbon"), entities=("Lisbon", "Sintra", "Alfama"),
            metadata={"conversationId": "conv-2026-03-28-a", "processed": True}),
    Example("2026-03-28 18:49:03.8", "conversation",
            _c("Lighter. I always overplan and then feel like I failed the itinerary.",
               "Then let's plan only the mornings and keep afternoons for whatever the city "
               "suggests. Failing an itinerary is impossible if the itinerary is mostly empty."),
            tags=("travel", "rest"), entities=("Lisbon",),
            metadata={"conversationId": "conv-2026-03-28-a"}),
    Example("2026-04-02 21:30:55.1", "inner_dialogue",
            "I felt irritated when Jordan rewrote my design doc without asking. Under the "
            "irritation is worry that my doc wasn't good enough. Both can be addressed in one "
            "honest conversation tomorrow.",
            tags=("work", "conflict"), entities=("Jordan",), importance=0.7),
    Example("2026-04-03 17:12:39.0", "conversation",
            _c("Talked to Jordan. They thought they were helping and apologized for not asking "
               "first. We agreed to use suggestions mode from now on.",
               "That sounds like a good outcome, and quick. How do you feel about the doc now?"),
            tags=("work", "conflict"), entities=("Jordan",), importance=0.6,
            metadata={"conversationId": "conv-2026-04-03-a", "processed": True}),
    Example("2026-04-08 07:58:21.7", "observation",
            "Rain all night and the trail app said 'too muddy' for the first time based on real "
            "data. It was right. Juniper disagreed and came home brown to the shoulders.",
            tags=("side-project", "juniper"), entities=("Juniper",), importance=0.6),
    Example("2026-04-12 14:26:08.2", "audio",
            "Voice note from the garden: the peas are up, the rhubarb is huge, and I need more "
            "twine. Remind me to thank Mrs. Alvarez for the compost.",
            tags=("voice-note", "garden"), entities=("Mrs. Alvarez",),
            metadata={"source": "watch", "durationSeconds": 11}),
    Example("2026-04-15 22:18:47.6", "reflection",
            "Three months into the mud app and I've kept the trail notes every single day. That's "
            "the longest I've kept any habit since university. It worked because it was tied to "
            "something I already do, not to something I wished I did.",
            tags=("habits", "side-project"), importance=0.8),
    Example("2026-04-19 06:12:33.4", "daydream",
            "Imagined a small cabin with a workshop, a vegetable garden twice the size of mine and "
            "a porch where Juniper could watch the road all day.",
            tags=("future", "home"), entities=("Juniper",)),
    Example("2026-04-23 20:40:12.9", "conversation",
            _c("Dad wants me to come home for his seventieth in May, but that's the week before "
               "Lisbon. I don't know if I can do both.",
               "Seventy is a big one, and you'd likely remember missing it. Could the Lisbon week "
               "shift by a few days, or could the visit be short?"),
            tags=("family", "travel"), entities=("Dad", "Lisbon"), importance=0.9,
            metadata={"conversationId": "conv-2026-04-23-a", "processed": True}),
    Example("2026-04-24 08:03:57.5", "tool_invocation",
            "calendar.search({\"query\": \"Lisbon\", \"from\": \"2026-05-01\"}) -> 2 events",
            tags=("tool", "calendar"), metadata={"tool": "calendar.search", "ok": True}),
    Example("2026-04-24 08:04:30.0", "action",
            "Moved the Lisbon flight hold from May 16 to May 19 and added Dad's birthday dinner "
            "on May 14.",
            tags=("calendar",), entities=("Dad", "Lisbon"), metadata={"approved": True}),
    Example("2026-04-24 08:06:12.2", "task",
            "Book train tickets home for May 13 and confirm the flight change by Friday.",
            tags=("todo", "travel"), metadata={"status": "open"}),
    Example("2026-04-29 19:25:44.0", "conversation",
            _c("Tell me honestly, is it weird to practice Portuguese by talking to my dog?",
               "Not weird at all. Juniper is a patient listener with no opinion on your verb "
               "endings, which is exactly what early practice needs."),
            tags=("portuguese", "juniper"), entities=("Juniper",),
            metadata={"conversationId": "conv-2026-04-29-a", "processed": True}),
    Example("2026-05-03 16:51:19.3", "observation",
            "Farmers market opened for the season. Bought strawberries that actually taste like "
            "strawberries and a small basil plant I will probably forget to water.",
            tags=("market", "food")),
    Example("2026-05-06 23:04:02.7", "inner_dialogue",
            "Am I taking the staff role too seriously? I've been rehearsing Monday's planning "
            "meeting in the shower. Preparation is good; rehearsing conversations that haven't "
            "happened is just worry wearing a tie.",
            tags=("work", "anxiety"), importance=0.6),
    Example("2026-05-10 07:35:26.1", "dream",
            "I dreamt Priya and I were kids again, building a raft out of recycling bins on the "
            "creek behind Grandma Ada's house. It floated. We were so proud.",
            tags=("dream", "family"), entities=("Priya", "Grandma Ada"), importance=0.5),
    Example("2026-05-14 22:47:38.8", "conversation",
            _c("Dad's birthday dinner was perfect. He gave a speech and thanked each of us by name. "
               "I didn't expect to cry.",
               "That sounds like a moment you'll keep. It's okay to be surprised by how much "
               "something means."),
            tags=("family", "dad"), entities=("Dad",), importance=1.0,
            metadata={"conversationId": "conv-2026-05-14-a", "processed": True}),
    Example("2026-05-20 12:14:59.6", "observation",
            "Lisbon, day one. The hills are steeper than the guidebook admitted. Ordered lunch "
            "entirely in Portuguese and the waiter only switched to English once, kindly.",
            tags=("travel", "lisbon", "portuguese"), entities=("Lisbon",), importance=0.8),
    Example("2026-05-23 21:36:45.2", "reflection",
            "Travelling with an empty itinerary felt strange for one day and wonderful after that. "
            "I noticed more because I wasn't checking the time. I want to bring some of that back "
            "home, maybe one unplanned afternoon a month.",
            tags=("travel", "rest"), entities=("Lisbon",), importance=0.9, category="curated",
            metadata={"curated": True}),
    Example("2026-05-27 18:08:14.4", "summary",
            "May summary: Dad's seventieth, a week in Lisbon with mornings planned and afternoons "
            "free, and the basil plant is somehow still alive.",
            tags=("summary", "month"), entities=("Dad", "Lisbon")),
    Example("2026-06-02 19:41:27.9", "conversation",
            _c("I want to stop using my phone as an alarm so I stop reading news in bed. Is a cheap "
               "alarm clock too simple to work?",
               "Simple is the point. If the phone charges in the kitchen, the morning starts with "
               "Juniper instead of headlines."),
            tags=("habits", "sleep"), entities=("Juniper",),
            metadata={"conversationId": "conv-2026-06-02-a", "processed": True}),
    # Present in the files, never trained on: the owner said no, or the reply was rated bad.
    Example("2026-06-05 21:02:11.5", "conversation",
            _c("The doctor wants more blood tests next month. I'm trying not to think about it.",
               "That's a lot to carry quietly. Would it help to put the appointment in the "
               "calendar and decide not to think about it until then?"),
            tags=("health", "private"), importance=0.9,
            metadata={"conversationId": "conv-2026-06-05-a", "trainingConsent": False}),
    Example("2026-06-08 10:20:33.0", "conversation",
            _c("What was the name of the bakery in Belém again?",
               "You should ask a travel agent about that."),
            tags=("travel",), entities=("Belém",),
            metadata={"conversationId": "conv-2026-06-08-a", "reinforcementSignal": -1}),
    Example("2026-06-10 22:26:48.1", "reflection",
            "Half a year of 'enough'. I sleep more, I ship less of my own code and more of other "
            "people's, and I have a dog who knows the word 'muddy'. It's a good trade.",
            tags=("new-year", "values"), entities=("Juniper",), importance=1.0),
    Example("2026-06-12 20:15:06.6", "file_read",
            "Read notes/trail-log.md (412 lines).",
            tags=("file",), metadata={"path": "notes/trail-log.md"}),
)


def _utc(ex: Example) -> datetime:
    naive = datetime.strptime(ex.local, "%Y-%m-%d %H:%M:%S.%f")
    return naive.replace(tzinfo=LOCAL_TZ).astimezone(UTC)


def event_id(ts: datetime) -> str:
    """``evt-`` + UTC ``YYYYMMDDHHMMSS`` + one fractional digit, as the writer names events."""
    return "evt-" + ts.strftime("%Y%m%d%H%M%S") + str(ts.microsecond // 100_000)


def slug(content: str) -> str:
    s = re.sub(r"[^a-z0-9-]+", "-", content.lower()).strip("-")[:50].rstrip("-")
    return s or "event"


def iso_z(ts: datetime) -> str:
    return ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"


def _relpath(ex: Example) -> Path:
    ts = _utc(ex)
    local = ts.astimezone(LOCAL_TZ)
    name = f"{event_id(ts)}-{slug(ex.content)}.json"
    if local.year < 2026:
        return Path(f"{local:%Y}") / name
    category = ex.category or _CATEGORY.get(ex.type)
    dated = Path(f"{local:%Y}/{local:%m}/{local:%d}")
    return (Path(category) / dated if category else dated) / name


def memory_object(ex: Example) -> dict[str, Any]:
    """The JSON object as the MetaHuman writer emits it (key order, omitted undefined fields)."""
    ts = _utc(ex)
    obj: dict[str, Any] = {"id": event_id(ts), "timestamp": iso_z(ts), "content": ex.content, "type": ex.type}
    if ex.response is not None:
        obj["response"] = ex.response
    obj["entities"] = list(ex.entities)
    obj["tags"] = list(ex.tags)
    obj["importance"] = ex.importance
    if ex.links_to is not None:
        obj["links"] = [{"type": "summarizes", "target": str(_relpath(EXAMPLES[ex.links_to]))}]
    if ts.year >= 2026:  # userId appeared with per-user profiles
        obj["userId"] = USER_ID
    metadata = dict(ex.metadata)
    if ex.parent is not None:
        metadata["parentEventId"] = event_id(_utc(EXAMPLES[ex.parent]))
    if metadata:
        obj["metadata"] = metadata
    return obj


def iter_example_files() -> Iterator[tuple[Path, str]]:
    """(relative path, file text) for every example, as the writer would lay them out."""
    for ex in EXAMPLES:
        yield _relpath(ex), json.dumps(memory_object(ex), indent=2, ensure_ascii=False) + "\n"
    yield _encrypted_example()


def _encrypted_example() -> tuple[Path, str]:
    """One file from an encrypted profile: unreadable without the key, counted as such."""
    digest = hashlib.sha256(b"mhd example ciphertext").digest()
    blob = {
        "iv": base64.b64encode(digest[:12]).decode(),
        "authTag": base64.b64encode(digest[12:28]).decode(),
        "ciphertext": base64.b64encode(digest * 8).decode(),
    }
    name = "evt-202606140310221-encrypted.json.enc"
    return Path("2026/06/13") / name, json.dumps(blob, indent=2) + "\n"


def write_examples(out_dir: Path) -> list[Path]:
    written = []
    for rel, text in iter_example_files():
        path = out_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def corpus() -> Iterator[str]:
    """Text the tiny tokenizer learns from: every example's words."""
    for ex in EXAMPLES:
        yield ex.content
        if ex.response:
            yield ex.response
        yield " ".join(ex.tags + ex.entities)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m mhd.devtools.examples OUT_DIR", file=sys.stderr)
        return 2
    paths = write_examples(Path(args[0]))
    print(f"wrote {len(paths)} files under {args[0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
