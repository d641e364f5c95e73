"""The /stats message for `YANRAY_ADMINS`: queue, throughput, GPU memory, users and uptime, in
one short message in the asker's language.

The figures are the ones `/metrics` serves (`bot/metrics.py`), read at once, plus two counts
from storage (users known, and users who asked something in the last day), so an admin
without a Prometheus still sees what the bot is doing.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from yanray.bot.i18n import translator
from yanray.bot.metrics import THROUGHPUT_WINDOW_S, Metrics
from yanray.bot.queue import RequestQueue
from yanray.storage import Database, crud

ACTIVE_WINDOW = timedelta(days=1)
GIB = 1024**3


async def stats_text(*, metrics: Metrics, queue: RequestQueue, db: Database, language: str) -> str:
    tr = translator(language)
    async with db.reading() as session:
        known, active = await crud.user_counts(session=session, since=datetime.now(UTC) - ACTIVE_WINDOW)
    lines = [
        tr.gettext("📊 Yanray, up for {uptime}").format(uptime=_duration(metrics.uptime(), language)),
        tr.gettext("Queue: {waiting} waiting, {running} of {slots} being answered").format(
            waiting=len(queue), running=len(queue.active), slots=queue.slots
        ),
        tr.gettext("Throughput: {rate} tokens/s over the last {minutes} min").format(
            rate=f"{metrics.tokens_per_second():.1f}", minutes=f"{THROUGHPUT_WINDOW_S / 60:g}"
        ),
        tr.gettext("Answers since start: {done} done, {failed} failed, {cancelled} stopped").format(
            done=metrics.finished.get("done", 0),
            failed=metrics.finished.get("failed", 0),
            cancelled=metrics.finished.get("cancelled", 0),
        ),
    ]
    memory = metrics.gpu_memory()
    if memory is None:
        lines.append(tr.gettext("GPU memory: none in use (CPU or remote engine)"))
    else:
        lines.append(
            tr.gettext("GPU memory: {used} GiB used, {peak} GiB at most, of {total} GiB").format(
                used=f"{memory.used / GIB:.1f}",
                peak=f"{memory.peak / GIB:.1f}",
                total=f"{memory.total / GIB:.1f}",
            )
        )
    lines.append(
        tr.gettext("Users: {known} known, {active} active in the last 24 h").format(
            known=known, active=active
        )
    )
    return "\n".join(lines)


def _duration(seconds: float, language: str) -> str:
    tr = translator(language)
    minutes = int(seconds // 60)
    days, minutes = divmod(minutes, 24 * 60)
    hours, minutes = divmod(minutes, 60)
    if days:
        return tr.gettext("{days} d {hours} h").format(days=days, hours=hours)
    if hours:
        return tr.gettext("{hours} h {minutes} min").format(hours=hours, minutes=minutes)
    return tr.gettext("{minutes} min").format(minutes=minutes)
