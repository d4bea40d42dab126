"""The bot-wide spending ledger: what each job costs (in the units `services/spend.py` defines), by UTC day; each
day's running total (`spend_days`: admission reads one row, whatever the day's volume); and which servers the
moderation log has told that the day's budget was reached. `services/spend.py` decides what the totals allow;
this is where they are counted. The running total goes down by itself when a job ends without reaching a backend
(a trigger on `jobs`, migration V10), so nothing outside the store has to remember to give a job's cost back."""

from __future__ import annotations

from pydantic import BaseModel

from services.store.database import Database

#: The day's total recounted from the ledger (what `spend_days` keeps up to date): rows not tied to a job yet count
#: (a job being created); a job's row counts unless the job ended without ever reaching a backend (no submission,
#: and no submit under way that may have arrived: `submit_key`).
_DAY_RECOUNT = ("SELECT COALESCE(SUM(s.units), 0) FROM spend AS s LEFT JOIN jobs AS j ON j.id = s.job_id "
                "WHERE s.day = ? AND (s.job_id IS NULL OR NOT (j.status IN ('blocked', 'failed', 'cancelled') "
                "AND j.attempts = 0 AND j.submit_key IS NULL))")
_DAY_TOTAL = "SELECT units FROM spend_days WHERE day = ?"


class Reserved(BaseModel):
    """The outcome of a reservation: its row (None when it didn't fit) and the day's total before it."""

    spend_id: int | None
    used_before: float


class SpendLedger:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def used(self, day: int) -> float:
        """What the jobs of UTC day `day` (unix time // 86400) cost, in units: one row, the day's running total."""
        return max(0.0, float(await self.db.scalar(_DAY_TOTAL, (day,)) or 0.0))

    async def recount(self, day: int) -> float:
        """The day's total summed from the ledger, job by job (what `used` must equal; for checks and repairs)."""
        return float(await self.db.scalar(_DAY_RECOUNT, (day,)) or 0.0)

    async def reserve(self, day: int, units: float, limit: float, *, guild_id: int | None, now: float) -> Reserved:
        """Record `units` on `day` if the day's total stays within `limit`: the total is read and the row written in
        one write transaction, so concurrent reservations can't both take the last of the budget."""
        async with self.db.transaction() as conn:
            async with conn.execute(_DAY_TOTAL, (day,)) as cur:
                row = await cur.fetchone()
            used = max(0.0, float(row[0])) if row is not None else 0.0
            if used + units > limit:
                return Reserved(spend_id=None, used_before=used)
            cur = await conn.execute("INSERT INTO spend (day, units, guild_id, created_at) VALUES (?, ?, ?, ?)",
                                     (day, units, guild_id, now))
            spend_id = cur.lastrowid
            await conn.execute("INSERT INTO spend_days (day, units) VALUES (?, ?) "
                               "ON CONFLICT (day) DO UPDATE SET units = units + excluded.units", (day, units))
        assert spend_id is not None
        return Reserved(spend_id=spend_id, used_before=used)

    async def attach(self, spend_id: int, job_id: int) -> None:
        """Tie a reservation to the job it was made for: from now on the job's state says whether it counts (a job
        that already ended without reaching a backend stops counting here; later ones, by the trigger)."""
        async with self.db.transaction() as conn:
            await conn.execute("UPDATE spend SET job_id = ? WHERE id = ? AND job_id IS NULL", (job_id, spend_id))
            async with conn.execute(
                    "SELECT s.day, s.units FROM spend AS s JOIN jobs AS j ON j.id = s.job_id WHERE s.id = ? "
                    "AND j.status IN ('blocked', 'failed', 'cancelled') AND j.attempts = 0 AND j.submit_key IS NULL",
                    (spend_id,)) as cur:
                ended = await cur.fetchone()
            if ended is not None:
                await conn.execute("UPDATE spend_days SET units = units - ? WHERE day = ?", (ended[1], ended[0]))

    async def release(self, spend_id: int) -> None:
        """Give a reservation back (its job was never created)."""
        async with self.db.transaction() as conn:
            async with conn.execute("SELECT day, units FROM spend WHERE id = ? AND job_id IS NULL",
                                    (spend_id,)) as cur:
                row = await cur.fetchone()
            if row is not None:
                await conn.execute("DELETE FROM spend WHERE id = ?", (spend_id,))
                await conn.execute("UPDATE spend_days SET units = units - ? WHERE day = ?", (row[1], row[0]))

    async def units_of(self, job_id: int) -> float | None:
        """What a job was recorded as costing (None: no record, e.g. no budget when it was created)."""
        value = await self.db.scalar("SELECT SUM(units) FROM spend WHERE job_id = ?", (job_id,))
        return None if value is None else float(value)

    async def first_notice(self, guild_id: int, day: int, *, now: float) -> bool:
        """True the first time this is asked for a server and day (the mod log says so then), False after."""
        async with self.db.transaction() as conn:
            cur = await conn.execute("INSERT OR IGNORE INTO spend_notices (guild_id, day, created_at) VALUES (?, ?, ?)",
                                     (guild_id, day, now))
            return cur.rowcount > 0

    async def forget_before(self, day: int) -> int:
        """Delete the ledger and notices of days before `day` (for retention); returns the ledger rows deleted."""
        async with self.db.transaction() as conn:
            cur = await conn.execute("DELETE FROM spend WHERE day < ?", (day,))
            await conn.execute("DELETE FROM spend_days WHERE day < ?", (day,))
            await conn.execute("DELETE FROM spend_notices WHERE day < ?", (day,))
            return cur.rowcount

    async def release_job(self, job_id: int) -> None:
        """A job that runs where it costs nothing (a pool's own worker): its reservation no longer counts."""
        async with self.db.transaction() as conn:
            async with conn.execute("SELECT day, SUM(units) FROM spend WHERE job_id = ? GROUP BY day",
                                    (job_id,)) as cur:
                rows = list(await cur.fetchall())
            await conn.execute("DELETE FROM spend WHERE job_id = ?", (job_id,))
            for day, total in rows:
                await conn.execute("UPDATE spend_days SET units = units - ? WHERE day = ?", (total, day))

    async def charge_job(self, job_id: int, day: int, units: float, *, guild_id: int | None, now: float) -> None:
        """A job that runs where it costs money (hosted fal) counts, on `day`, unless it already does (its
        reservation at admission); no budget check: it was admitted, and is running already."""
        async with self.db.transaction() as conn:
            async with conn.execute("SELECT 1 FROM spend WHERE job_id = ? LIMIT 1", (job_id,)) as cur:
                if await cur.fetchone() is not None:
                    return
            await conn.execute("INSERT INTO spend (day, units, job_id, guild_id, created_at) VALUES (?, ?, ?, ?, ?)",
                               (day, units, job_id, guild_id, now))
            await conn.execute("INSERT INTO spend_days (day, units) VALUES (?, ?) "
                               "ON CONFLICT (day) DO UPDATE SET units = units + excluded.units", (day, units))
