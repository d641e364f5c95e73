"""The dispatcher: commands, access checks, and accepting questions into the journal.

A question is written to storage first (the user turn and a `queued` request, one
transaction) and only then enqueued, so nothing accepted lives only in memory. Command
words are recognised only at the start of a message ("/reset", "/history 5",
"/system@yanray_bot be brief"); an unknown command is an ordinary question, since the
text a user types is data and never runs a tool.

Where the design is silent:
- `/system default` goes back to the configured `YANRAY_SYSTEM_PROMPT`.
- `/retry` regenerates the latest answered question; while a question is still
  waiting or being answered it asks the user to wait or /stop first.
- Refused users (not in `YANRAY_ALLOWED_USERS`, or shut out with `/deny`: see `bot/people.py`,
  which also answers /good, /bad, /share and /allow) hear one refusal per process run, then
  silence, so a stranger cannot make the bot spam a group; `/allow` lets them hear it again.
- The rate limit is a sliding minute per user, in memory (`YANRAY_RATE_LIMIT_PER_MINUTE`).
  Questions, edits that regenerate an answer, `/retry` and setting `/system` (which costs a
  count of the new prompt's tokens) count against it; other commands are cheap and do not.
- `/lang en|zh` keeps the language of Yanray's own texts with the conversation (`/lang auto`
  forgets it); see `bot/i18n.py` for the order. What the dispatcher says to someone is in the
  language resolved for their message; a question's job carries it, and so does its stored
  route (`route["language"]`), so a request recovered after a restart is answered in it too.
- In a shared conversation (a group whose members share one), `/reset`, setting
  `/system` and `/lang` belong to the chat's moderators (`Incoming.moderator`: Telegram group
  administrators, Discord members with Manage Messages) and `YANRAY_ADMINS`; `/stop`
  stops the asker's own answers, and a moderator's stops everyone's.
- `/stats` (queue, throughput, GPU memory, users, uptime; `bot/stats.py`) answers
  `YANRAY_ADMINS` only; anyone else gets one line saying so. It is not in the command menus.
"""

from __future__ import annotations

import logging
import re
import time
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from typing import Any

from yanray.bot.context import MIN_QUESTION_TOKENS
from yanray.bot.errors import QueueFull
from yanray.bot.i18n import LANGUAGE_NAMES, LANGUAGES, N_, normalize, resolve, translator
from yanray.bot.metrics import Metrics
from yanray.bot.people import COMMAND_WORDS, People
from yanray.bot.queue import Job, RequestQueue
from yanray.bot.settings import Settings
from yanray.bot.stats import stats_text
from yanray.bot.types import Incoming, ReplyStream
from yanray.bot.worker import EngineWorker
from yanray.storage import Conversation, Database, User, crud

logger = logging.getLogger(__name__)

#: the command menus' entries (Telegram's menu, Discord's slash commands), msgids of the catalog
COMMANDS: list[tuple[str, str]] = [
    ("help", N_("What I can do and how to use me")),
    ("reset", N_("Start a fresh conversation (old messages stay stored)")),
    ("stop", N_("Stop the answer being written or waiting")),
    ("retry", N_("Write the last answer again")),
    ("history", N_("Show the last messages of this conversation: /history [n]")),
    ("system", N_("Show or set this conversation's instructions: /system [text|default]")),
    ("lang", N_("Show or choose my language: /lang [en|zh|auto]")),
    ("share", N_("Show or choose whether your chats may train my model: /share [on|off]")),
]
MAX_MESSAGE_CHARS = 100_000
MAX_SYSTEM_CHARS = 4_000
HISTORY_DEFAULT, HISTORY_MAX, HISTORY_CLIP = 10, 50, 300
_COMMAND = re.compile(r"^/([A-Za-z_]++)(?:@\w++)?(?:\s++(.*+))?$", re.DOTALL)
RATE_LIMITED = N_("You're sending messages faster than I can read them; wait a minute and try again.")
MODERATORS_ONLY = {
    "reset": N_("In this shared conversation only the chat's admins can /reset it."),
    "system": N_("In this shared conversation only the chat's admins can change my instructions."),
    "lang": N_("In this shared conversation only the chat's admins can change my language."),
}
STOPPED = N_("Stopped.")
REPLACED = N_("Replaced by your edited message.")

HELP = N_("""I'm Yanray, a personal assistant running on a local language model. Just write to me.
I remember our conversation.

/reset - start a fresh conversation
/stop - stop the current answer
/retry - write the last answer again
/history [n] - show the last n messages
/system [text] - show or set my instructions for this conversation (/system default to undo)
/lang [en|zh|auto] - show or choose my language (auto: your app's)
/good, /bad - rate my last answer (or react to it with 👍 or 👎)
/share [on|off] - show or choose whether your chats may be exported to train my model""")
#: the line /help adds under its first paragraph when tools are enabled (`help_text`)
TOOLS_HELP = N_("While answering I can use: {tools}.")
#: what each tool is, in a few words, for that line (in YANRAY_TOOLS order)
TOOL_HELP = {
    "calculate": N_("a calculator"),
    "fetch": N_("a web page reader"),
    "search": N_("web search"),
    "time": N_("a clock with time zones"),
    "plot": N_("graph plotting"),
}
#: how the tools in that line are joined, by language (Chinese lists use 、)
TOOLS_JOIN = {"zh": "、"}
#: what /help adds for YANRAY_ADMINS
ADMIN_HELP = N_("""For my admins:
/allow platform:id - let this person use me
/deny platform:id - shut this person out
/stats - queue, speed, memory and users""")


def help_text(language: str, tools: Sequence[str]) -> str:
    """What /help says in `language`, with a line naming the enabled `tools` (none: no line)."""
    tr = translator(language)
    text = tr.gettext(HELP)
    if not tools:
        return text
    named = TOOLS_JOIN.get(language, ", ").join(
        tr.gettext(TOOL_HELP[name]) for name in tools if name in TOOL_HELP
    )
    head, _, rest = text.partition("\n\n")
    return f"{head}\n{tr.gettext(TOOLS_HELP).format(tools=named)}\n\n{rest}"


def position_text(position: int, language: str = "en") -> str:
    """The queue notice for place `position` in line (1: next, at the next free slot; see
    `RequestQueue.position`), in `language`: the one wording of it on every platform."""
    tr = translator(language)
    if position <= 1:
        return tr.gettext("You're next.")
    ahead = position - 1
    return tr.ngettext(
        "{count} request is ahead of yours.", "{count} requests are ahead of yours.", ahead
    ).format(count=ahead)


def queue_notice(position: int, language: str = "en") -> str:
    """What a waiting question shows until its answer replaces it."""
    return f"⏳ {position_text(position, language)}"


class Dispatcher:
    def __init__(
        self,
        *,
        settings: Settings,
        db: Database,
        queue: RequestQueue,
        worker: EngineWorker,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.db = db
        self.queue = queue
        self.worker = worker
        #: the adapters report their platforms' errors here too
        self.metrics = metrics
        self._refused: set[str] = set()
        self._recent: defaultdict[str, deque[float]] = defaultdict(deque)
        #: ratings, /share, and the admins' /allow and /deny
        self.people = People(settings=settings, db=db)

    def tools(self) -> list[str]:
        """The tools the model may call (those built, when tool rounds are allowed)."""
        return list(self.worker.tools) if self.settings.tool_rounds > 0 else []

    async def handle(self, incoming: Incoming, out: ReplyStream) -> None:
        """Answer a command at once, or accept a question for the engine."""
        who = self._who(incoming)
        if not await self._allowed(who):
            if who not in self._refused:
                self._refused.add(who)
                logger.info("refused %s (not in YANRAY_ALLOWED_USERS, or denied)", who)
                tr = translator(self.hint_language(incoming.language))  # strangers get no stored row
                await out.send(
                    tr.gettext("Sorry, I only answer people my owner allowed. Your id is {who}.").format(
                        who=who
                    )
                )
            return
        if len(incoming.text) > MAX_MESSAGE_CHARS:  # before any parsing
            logger.info("refused a message of %d characters from %s", len(incoming.text), who)
            tr = translator(await self.language(incoming))
            await out.send(
                tr.gettext(
                    "Your message is too long (over {limit} characters). "
                    "Please shorten it or send it in parts."
                ).format(limit=f"{MAX_MESSAGE_CHARS:,}")
            )
            return
        text = incoming.text.strip()
        match = _COMMAND.match(text)
        command = match.group(1).lower() if match else ""
        if command in ("start", "help"):
            language = await self.language(incoming)
            admin = f"\n\n{translator(language).gettext(ADMIN_HELP)}" if who in self.settings.admins else ""
            await out.send(help_text(language, self.tools()) + admin)
            return
        if command in COMMAND_WORDS:
            argument = (match.group(2) or "").strip() if match else ""
            conversation = await self._conversation(incoming)
            language = self._resolve(conversation.language, incoming)
            await self.people.command(command, argument, conversation, incoming, out, language)
            if command == "allow":
                self._refused.discard(argument)  # a later /deny is told once again
            return
        if command == "stats":
            await self._cmd_stats(incoming, out, who)
            return
        if command in ("reset", "stop", "retry", "history", "system", "lang"):
            argument = (match.group(2) or "").strip() if match else ""
            conversation = await self._conversation(incoming)
            language = self._resolve(conversation.language, incoming)
            tr = translator(language)
            if incoming.shared and command in MODERATORS_ONLY and not self._moderates(incoming, who):
                if command == "reset" or argument:  # showing the settings is for everyone
                    await out.send(tr.gettext(MODERATORS_ONLY[command]))
                    return
            costly = command == "retry" or (command == "system" and argument)
            if costly and not self._within_rate(who):
                await out.send(tr.gettext(RATE_LIMITED))
                return
            await getattr(self, f"_cmd_{command}")(conversation, argument, incoming, out, language)
            return
        if not text:
            tr = translator(await self.language(incoming))
            await out.send(tr.gettext("Ask me anything: write your question after the mention."))
            return
        if not self._within_rate(who):
            logger.info("rate limit: %s", who)
            await out.send(translator(await self.language(incoming)).gettext(RATE_LIMITED))
            return
        await self._accept(incoming, text, out)

    async def language(self, incoming: Incoming) -> str:
        """The language of Yanray's own texts for this message's sender (an adapter's own
        lines use it too): fixed by the operator, chosen with /lang, or the platform's hint."""
        if self.settings.language != "auto":
            return self.settings.language
        conversation = await self._conversation(incoming)
        return self._resolve(conversation.language, incoming)

    def hint_language(self, hint: str | None) -> str:
        """The language when no conversation is at hand (a stranger, a failed update)."""
        return resolve(self.settings.language, None, hint)

    def _resolve(self, stored: str | None, incoming: Incoming) -> str:
        return resolve(self.settings.language, stored, incoming.language)

    async def handle_edit(self, incoming: Incoming, answer: Callable[[Any], ReplyStream]) -> bool:
        """The user edited a message: regenerate if it is the conversation's latest question.

        `answer(shown)` makes the stream for the new answer, called once the edit is known to
        replace an answer: `shown` is what the streams of that question's earlier answer
        reported showing (`ReplyStream.watch`, stored with the requests), or None. It links
        the question to its answer on the screen across restarts, so a stream that has no
        live predecessor to take over edits those messages instead of writing new ones.

        Returns whether the stream now answers the edit (the earlier answer is replaced). An
        edit counts against the rate limit like a question: past it, the earlier answer is
        stopped and replaced by the rate-limit line instead of a new answer."""
        who = self._who(incoming)
        if incoming.message_id is None or len(incoming.text) > MAX_MESSAGE_CHARS:
            return False
        if not await self._allowed(who):
            return False
        text = incoming.text.strip()
        if not text or _COMMAND.match(text):
            return False
        conversation = await self._conversation(incoming)
        async with self.db.transaction() as session:
            message = await crud.find_user_message(
                session=session, conversation_id=conversation.id, external_id=incoming.message_id
            )
            latest = await crud.latest_user_message(session=session, conversation_id=conversation.id)
            if message is None or latest is None or message.id != latest.id:
                return False
            if message.turn <= conversation.context_start:
                return False  # asked before a /reset: that conversation is closed
            old = await crud.latest_request(session=session, conversation_id=conversation.id)
            shown = await crud.shown_answer(session=session, user_message_id=message.id)
        previous = old.id if old is not None and old.user_message_id == message.id else None
        language = self._resolve(conversation.language, incoming)
        out = answer(shown)
        if previous is not None:
            await self._cancel_request(previous, REPLACED)
        if not self._within_rate(who):
            logger.info("rate limit: %s edited message %s", who, incoming.message_id)
            await out.send(translator(language).gettext(RATE_LIMITED))
            return True
        await self._ask_again(conversation.id, message.id, previous, incoming, out, language, text=text)
        return True

    async def blocked_chats(self, platform: str) -> set[str]:
        """The chats of `platform` that refused the bot's messages (stored, so a restart does
        not write to them again); an adapter reads them when it starts."""
        async with self.db.transaction() as session:
            return await crud.blocked_chats(session=session, platform=platform)

    async def note_blocked(self, platform: str, chat_id: str, blocked: bool) -> None:
        """Store that a chat refused the bot's messages, or (`blocked` False) wrote again."""
        async with self.db.transaction() as session:
            await crud.set_blocked(session=session, platform=platform, chat_id=chat_id, blocked=blocked)

    def is_pending(self, out: ReplyStream) -> bool:
        """Whether a request answered through `out` is waiting or being answered."""
        return any(j.out is out for j in self.queue.active) or any(
            j.out is out for j in self.queue.schedule()
        )

    # -- questions ---------------------------------------------------------------------

    async def _accept(self, incoming: Incoming, text: str, out: ReplyStream) -> None:
        """Store the question and its request in one transaction, then queue it.

        The queue place is reserved inside the transaction, once the conversation is known,
        and given back if the transaction does not commit."""
        reserved: int | None = None
        language = self.hint_language(incoming.language)
        try:
            async with self.db.transaction() as session:
                conversation, user = await self._get_conversation(session, incoming)
                language = self._resolve(conversation.language, incoming)
                if incoming.message_id is not None and await crud.find_user_message(
                    session=session, conversation_id=conversation.id, external_id=incoming.message_id
                ):
                    # the platform delivered it again (Telegram resends an update whose receipt
                    # it never heard of, e.g. after a crash): it is stored, and answered once
                    logger.info("message %s is already stored; not asked again", incoming.message_id)
                    return
                self.queue.reserve(conversation.id)
                reserved = conversation.id
                message = await crud.add_message(
                    session=session,
                    conversation_id=conversation.id,
                    role="user",
                    text=text,
                    user_id=user.id,
                    external_id=incoming.message_id,
                )
                request = await crud.create_request(
                    session=session,
                    conversation_id=conversation.id,
                    user_message_id=message.id,
                    route=self._route(incoming, language),
                    owner=self.worker.claims.owner,
                    lease=self.worker.claims.lease,
                )
        except QueueFull as exc:
            logger.info("queue full for %s:%s", incoming.platform, incoming.chat_id)
            await out.send(exc.say(language))
            return
        except BaseException:
            if reserved is not None:
                self.queue.release(reserved)
            raise
        job = Job(request.id, conversation.id, out, asker=self._who(incoming), language=language)
        await self._enqueue(job, reserved=True)

    async def _enqueue(self, job: Job, *, reserved: bool = True) -> None:
        self.worker.track(job.request_id, job.out)
        position = self.queue.put(job, reserved=reserved)
        if position > 0:
            await job.out.notice(queue_notice(position, job.language))

    async def _ask_again(
        self,
        conversation_id: int,
        message_id: int,
        previous: int | None,
        incoming: Incoming,
        out: ReplyStream,
        language: str,
        *,
        text: str | None = None,
    ) -> None:
        """Queue a stored question again (/retry, an edit), its previous answer set aside."""
        try:
            self.queue.reserve(conversation_id)
        except QueueFull as exc:
            await out.send(exc.say(language))
            return
        try:
            async with self.db.transaction() as session:
                if previous is not None:
                    await crud.supersede_answer(session=session, request_id=previous)
                await crud.restore_message(session=session, message_id=message_id, text=text)
                request = await crud.create_request(
                    session=session,
                    conversation_id=conversation_id,
                    user_message_id=message_id,
                    route=self._route(incoming, language),
                    owner=self.worker.claims.owner,
                    lease=self.worker.claims.lease,
                )
        except BaseException:
            self.queue.release(conversation_id)
            raise
        job = Job(request.id, conversation_id, out, asker=self._who(incoming), language=language)
        await self._enqueue(job)

    def _route(self, incoming: Incoming, language: str) -> dict[str, object]:
        # the language too: a request recovered after a restart is answered in it
        return {
            **incoming.route,
            "platform": incoming.platform,
            "asker": self._who(incoming),
            "language": language,
        }

    @staticmethod
    def _who(incoming: Incoming) -> str:
        return f"{incoming.platform}:{incoming.user_id}"

    # -- commands ----------------------------------------------------------------------

    async def _cmd_reset(
        self, conversation: Conversation, _arg: str, _in: Incoming, out: ReplyStream, language: str
    ) -> None:
        async with self.db.transaction() as session:
            await crud.reset_conversation(session=session, conversation_id=conversation.id)
        tr = translator(language)
        await out.send(tr.gettext("Fresh start: I've set our earlier messages aside (they stay stored)."))

    async def _cmd_stop(
        self, conversation: Conversation, _arg: str, incoming: Incoming, out: ReplyStream, language: str
    ) -> None:
        # in a shared conversation a member stops only their own answers; its moderators, all
        who = self._who(incoming)
        asker = who if incoming.shared and not self._moderates(incoming, who) else None
        stopped = await self._cancel(conversation.id, reason=STOPPED, asker=asker)
        tr = translator(language)
        if stopped:
            await out.send(tr.gettext(STOPPED))
        elif asker is not None:
            await out.send(
                tr.gettext("You have no answer to stop here (only the chat's admins can stop others').")
            )
        else:
            await out.send(tr.gettext("There is nothing to stop."))

    async def _cmd_retry(
        self, conversation: Conversation, _arg: str, incoming: Incoming, out: ReplyStream, language: str
    ) -> None:
        async with self.db.transaction() as session:
            busy = bool(await crud.active_requests(session=session, conversation_id=conversation.id))
            last = await crud.latest_request(session=session, conversation_id=conversation.id)
        tr = translator(language)
        if busy:
            await out.send(tr.gettext("I'm still answering; wait for it (or /stop it) before /retry."))
            return
        if last is None or last.user_message_id <= conversation.context_start:
            await out.send(tr.gettext("There is no answer to retry yet."))
            return
        await self._ask_again(conversation.id, last.user_message_id, last.id, incoming, out, language)

    async def _cmd_history(
        self, conversation: Conversation, arg: str, _in: Incoming, out: ReplyStream, language: str
    ) -> None:
        tr = translator(language)
        count = HISTORY_DEFAULT
        if arg:
            if not arg.isdigit() or not 1 <= int(arg) <= HISTORY_MAX:
                await out.send(
                    tr.gettext("Usage: /history [n], with n from 1 to {most}.").format(most=HISTORY_MAX)
                )
                return
            count = int(arg)
        async with self.db.transaction() as session:
            messages = await crud.recent_messages(session=session, conversation=conversation, limit=count)
        if not messages:
            await out.send(tr.gettext("Our conversation is empty."))
            return
        you = tr.gettext("You")
        lines = []
        for m in messages:
            text = m.text if len(m.text) <= HISTORY_CLIP else m.text[: HISTORY_CLIP - 1] + "…"
            lines.append(f"{you if m.role == 'user' else 'Yanray'}: {text}")
        await out.send("\n\n".join(lines))

    async def _cmd_system(
        self, conversation: Conversation, arg: str, _in: Incoming, out: ReplyStream, language: str
    ) -> None:
        tr = translator(language)
        if not arg:
            if conversation.system_prompt:
                shown = tr.gettext("My instructions (this conversation's):\n{text}")
            else:
                shown = tr.gettext("My instructions (the default):\n{text}")
            current = conversation.system_prompt or self.settings.default_prompt(language)
            await out.send(shown.format(text=current))
            return
        if len(arg) > MAX_SYSTEM_CHARS:
            await out.send(
                tr.gettext("Those instructions are too long ({length} characters; at most {most}).").format(
                    length=len(arg), most=MAX_SYSTEM_CHARS
                )
            )
            return
        new = None if arg.lower() == "default" else arg
        if new is not None:
            fixed, room = await self.worker.measure_room(new)
            if room < MIN_QUESTION_TOKENS:
                await out.send(
                    tr.gettext(
                        "Those instructions are too long for my context (about {tokens} tokens; "
                        "at most {most} fit)."
                    ).format(tokens=fixed, most=fixed + room - MIN_QUESTION_TOKENS)
                )
                return
        async with self.db.transaction() as session:
            await crud.set_system_prompt(session=session, conversation_id=conversation.id, text=new)
        if new is None:
            await out.send(tr.gettext("Back to the default instructions."))
        else:
            await out.send(tr.gettext("Instructions set for this conversation."))

    async def _cmd_stats(self, incoming: Incoming, out: ReplyStream, who: str) -> None:
        language = await self.language(incoming)
        if who not in self.settings.admins:
            logger.info("/stats refused for %s (not in YANRAY_ADMINS)", who)
            await out.send(
                translator(language).gettext("Only Yanray's admins (YANRAY_ADMINS) can use /stats.")
            )
            return
        await out.send(
            await stats_text(metrics=self.metrics, queue=self.queue, db=self.db, language=language)
        )

    async def _cmd_lang(
        self, conversation: Conversation, arg: str, incoming: Incoming, out: ReplyStream, language: str
    ) -> None:
        choice = arg.lower()
        tr = translator(language)
        if self.settings.language != "auto":
            await out.send(
                tr.gettext(
                    "My owner set my language to {name} for everyone (YANRAY_LANGUAGE), so /lang "
                    "cannot change it."
                ).format(name=LANGUAGE_NAMES[language])
            )
            return
        if not choice:
            chosen = conversation.language in LANGUAGES
            if chosen:
                current = tr.gettext("I write in {name} here (chosen with /lang).")
            else:
                current = tr.gettext("I write in {name} here (your app's language).")
            await out.send(
                current.format(name=LANGUAGE_NAMES[language])
                + "\n"
                + tr.gettext("Choose: /lang en (English), /lang zh (简体中文), /lang auto (your app's).")
            )
            return
        if choice not in (*LANGUAGES, "auto"):
            await out.send(tr.gettext("Usage: /lang en, /lang zh or /lang auto."))
            return
        stored = None if choice == "auto" else choice
        async with self.db.transaction() as session:
            await crud.set_language(session=session, conversation_id=conversation.id, language=stored)
        now = stored or normalize(incoming.language)
        tr = translator(now)
        if stored is None:
            await out.send(
                tr.gettext("I'll follow your app's language again: {name}.").format(name=LANGUAGE_NAMES[now])
            )
        else:
            await out.send(tr.gettext("From now on I write in {name} here.").format(name=LANGUAGE_NAMES[now]))

    # -- helpers -----------------------------------------------------------------------

    async def _cancel(self, conversation_id: int, *, reason: str, asker: str | None = None) -> bool:
        """Cancel this conversation's waiting and running requests (only `asker`'s, if given);
        `reason` is a msgid, told to each asker in their job's language."""
        waiting = self.queue.cancel_conversation(conversation_id, asker=asker)
        await self._close_cancelled(waiting, reason)
        running = self.worker.cancel_running(conversation_id, reason=reason, asker=asker)
        return bool(waiting) or running is not None

    async def _cancel_request(self, request_id: int, reason: str) -> None:
        """Cancel one request, waiting or running."""
        job = self.queue.find(request_id)
        if job is not None and self.queue.remove(job):
            await self._close_cancelled([job], reason)
            return
        running = self.queue.running_job(request_id)
        if running is not None:
            self.worker.cancel_running(running.conversation_id, reason=reason)

    async def _close_cancelled(self, jobs: list[Job], reason: str) -> None:
        if not jobs:
            return
        said = {job: translator(job.language).gettext(reason) for job in jobs}
        async with self.db.transaction() as session:
            for job in jobs:
                await crud.finish_request(
                    session=session, request_id=job.request_id, status="cancelled", error=said[job]
                )
                await crud.mark_delivered(session=session, request_id=job.request_id)
        for job in jobs:
            self.metrics.request_finished("cancelled")
            await job.out.fail(said[job])

    async def _conversation(self, incoming: Incoming) -> Conversation:
        async with self.db.transaction() as session:
            conversation, _user = await self._get_conversation(session, incoming)
        return conversation

    async def _get_conversation(self, session: Any, incoming: Incoming) -> tuple[Conversation, User]:
        return await crud.get_or_create_conversation(
            session=session,
            platform=incoming.platform,
            chat_id=incoming.chat_id,
            user_key=incoming.conversation_user,
            user_external_id=incoming.user_id,
            display_name=incoming.display_name,
        )

    def _moderates(self, incoming: Incoming, who: str) -> bool:
        return incoming.moderator or who in self.settings.admins

    async def _allowed(self, who: str) -> bool:
        return await self.people.allowed(who)

    def _within_rate(self, who: str) -> bool:
        limit = self.settings.rate_limit_per_minute
        if not limit:
            return True
        now = time.monotonic()
        recent = self._recent[who]
        while recent and now - recent[0] > 60:
            recent.popleft()
        if len(recent) >= limit:
            return False
        recent.append(now)
        return True
