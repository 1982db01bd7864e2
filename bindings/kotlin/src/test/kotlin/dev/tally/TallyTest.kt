package dev.tally

import java.nio.file.Files
import java.nio.file.Path
import java.time.Instant
import java.util.concurrent.CountDownLatch
import java.util.concurrent.Executors
import java.util.concurrent.TimeUnit
import java.util.concurrent.atomic.AtomicLong
import kotlinx.coroutines.CoroutineStart
import kotlinx.coroutines.Dispatchers
import kotlinx.coroutines.async
import kotlinx.coroutines.delay
import kotlinx.coroutines.flow.first
import kotlinx.coroutines.runBlocking
import kotlinx.coroutines.withTimeout
import org.junit.jupiter.api.AfterEach
import org.junit.jupiter.api.Assertions.assertEquals
import org.junit.jupiter.api.Assertions.assertFalse
import org.junit.jupiter.api.Assertions.assertNotNull
import org.junit.jupiter.api.Assertions.assertNull
import org.junit.jupiter.api.Assertions.assertThrows
import org.junit.jupiter.api.Assertions.assertTrue
import org.junit.jupiter.api.BeforeEach
import org.junit.jupiter.api.Test
import org.junit.jupiter.api.io.TempDir

const val CATALOG = """
{"models": {"gpt-4o": {"input_micros_per_mtok": 2500000, "output_micros_per_mtok": 10000000}},
 "plans": [{"id": "free", "features": {
   "ai_chat": {"type": "metered", "limit": 3, "period": "month", "enforcement": "hard"},
   "export":  {"type": "flag", "enabled": false},
   "notes":   {"type": "metered", "limit": null, "period": "day"}}},
  {"id": "pro", "features": {
   "ai_chat": {"type": "metered", "limit": 100, "period": "month", "enforcement": "hard"},
   "export":  {"type": "flag", "enabled": true},
   "notes":   {"type": "metered", "limit": null, "period": "day"}}}],
 "products": [
   {"id": "pro_monthly", "store": "play", "grants": {"plan": "pro"}},
   {"id": "credits_100", "store": "play", "grants": {"credits": 100}}]}
"""

/** A clock the test moves by hand, supplied to the library through the TallyClock callback. */
class TestClock(start: Instant) : TallyClock {
    val ms = AtomicLong(start.toEpochMilli())
    override fun nowMs(): Long = ms.get()
    fun set(at: Instant) = ms.set(at.toEpochMilli())
}

class TallyTest {
    @TempDir
    lateinit var dir: Path

    private val clock = TestClock(Instant.parse("2025-03-10T12:00:00Z"))
    private lateinit var tally: Tally

    private fun open(path: Path = dir.resolve("tally.db")): Tally =
        Tally.open(
            path.toString(),
            TallyConfig(
                deviceId = "device-a",
                catalogJson = CATALOG,
                defaultSettingsJson = """{"theme": "light", "fontSize": 12}""",
                localOnlySettings = listOf("theme"),
                clock = clock,
            ),
        )

    @BeforeEach
    fun setUp() {
        tally = open()
    }

    @AfterEach
    fun tearDown() {
        tally.close()
    }

    @Test
    fun `opens a file database and keeps data across reopen`() {
        val user = tally.createLocalUser("Ada")
        assertEquals("Ada", user.displayName)
        assertEquals("UTC", user.timezone)
        assertEquals(clock.nowMs(), user.createdAtMs)
        assertEquals("device-a", tally.deviceId())
        tally.consume(user.id, "ai_chat")
        tally.close()

        tally = open()
        assertEquals(listOf(user.id), tally.users().map { it.id })
        assertEquals(1L, tally.usage(user.id, "ai_chat").used)
        assertEquals(1L, tally.pendingEvents(user.id))
        assertTrue(Files.exists(dir.resolve("tally.db")))
    }

    @Test
    fun `creates users and signs in, attaching the local ledger`() {
        val local = tally.createLocalUser()
        assertNull(local.externalId)
        assertFalse(local.signedIn)
        tally.consume(local.id, "ai_chat", 2L)

        val signed = tally.signIn(Profile(externalId = "auth0|ada", email = "ada@example.com", displayName = "Ada"), attachLocal = local.id)
        assertEquals("auth0|ada", signed.externalId)
        assertTrue(signed.signedIn)
        assertEquals(listOf(signed.id), tally.users().map { it.id })
        assertEquals(2L, tally.usage(signed.id, "ai_chat").used)
        assertEquals(1L, tally.pendingEvents(signed.id), "one event of amount 2")

        // Signing in again with the same subject finds the same account.
        assertEquals(signed.id, tally.signIn(Profile(externalId = "auth0|ada")).id)

        tally.signOut(signed.id)
        assertFalse(tally.user(signed.id).signedIn)
        assertEquals(1L, tally.pendingEvents(signed.id), "sign-out keeps unsynced events")

        val updated = tally.updateUser(signed.id, UserUpdate(timezone = "Europe/Paris", displayName = "Ada L."))
        assertEquals("Europe/Paris", updated.timezone)
        assertEquals("Ada L.", updated.displayName)

        val e = assertThrows(TallyException.UnsyncedEvents::class.java) { tally.deleteUser(signed.id) }
        assertTrue(e.message!!.contains("1 unsynced"), e.message)
        tally.deleteUser(signed.id, force = true)
        assertThrows(TallyException.NotFound::class.java) { tally.user(signed.id) }
    }

    @Test
    fun `settings round trip as JSON strings`() {
        val u = tally.createLocalUser().id
        assertEquals("\"light\"", tally.setting(u, "theme"), "defaults apply")
        tally.setSetting(u, "theme", "\"dark\"")
        tally.setSetting(u, "layout", """{"columns": 2, "compact": true}""")
        assertEquals("\"dark\"", tally.setting(u, "theme"))
        assertEquals("""{"columns":2,"compact":true}""", tally.setting(u, "layout"))

        tally.patchSettings(u, """{"fontSize": 14, "layout": null}""")
        assertNull(tally.setting(u, "layout"))
        assertEquals("14", tally.setting(u, "fontSize"))
        assertEquals("""{"fontSize":14,"theme":"dark"}""", tally.settings(u))

        tally.removeSetting(u, "theme")
        assertEquals("\"light\"", tally.setting(u, "theme"), "a deleted setting falls back to its default")

        assertEquals(SettingStatus.NotSet, tally.settingStatus(u, "never"))
        assertEquals(SettingStatus.Pending, tally.settingStatus(u, "fontSize"), "written, not yet synced")
        assertEquals(SettingStatus.LocalOnly, tally.settingStatus(u, "theme"))
        assertThrows(TallyException.InvalidInput::class.java) { tally.settingStatus(u, "") }

        tally.replaceSettings(u, """{"a": [1, 2, 3]}""")
        assertEquals("[1,2,3]", tally.setting(u, "a"))
        assertEquals("""{"a":[1,2,3],"fontSize":12,"theme":"light"}""", tally.settings(u), "replace deletes the keys it does not name")
    }

    @Test
    fun `consume until limit_reached`() {
        val u = tally.createLocalUser().id
        for (i in 1..3) {
            val d = tally.consume(u, "ai_chat")
            assertTrue(d.allowed)
            assertEquals(Reason.OK, d.reason)
            assertEquals(i.toLong(), d.used)
            assertEquals(3L, d.limit)
            assertEquals((3 - i).toLong(), d.remaining)
            assertEquals("free", d.accessReason)
            assertEquals(Instant.parse("2025-04-01T00:00:00Z").toEpochMilli(), d.resetsAtMs)
        }
        val denied = tally.consume(u, "ai_chat")
        assertFalse(denied.allowed)
        assertEquals(Reason.LIMIT_REACHED, denied.reason)
        assertEquals(0L, denied.remaining)
        assertEquals(3L, tally.pendingEvents(u), "a denied consume records nothing")
        assertEquals(Reason.LIMIT_REACHED, tally.check(u, "ai_chat").reason)

        val usage = tally.usage(u, "ai_chat")
        assertEquals(3L, usage.used)
        assertEquals(Period.MONTH, usage.period)
        assertEquals(Instant.parse("2025-03-01T00:00:00Z").toEpochMilli(), usage.periodStartMs)

        assertEquals(Reason.NOT_IN_PLAN, tally.check(u, "export").reason)
        assertEquals(Reason.UNKNOWN_FEATURE, tally.check(u, "teleport").reason)

        // The foreign clock drives the windows: next month, the counter starts over.
        clock.set(Instant.parse("2025-04-02T08:00:00Z"))
        assertTrue(tally.consume(u, "ai_chat").allowed)
        assertEquals(1L, tally.usage(u, "ai_chat").used)
    }

    @Test
    fun `entitlements set locally change the limits`() {
        val u = tally.createLocalUser().id
        assertEquals("free", tally.entitlements(u).plan)
        tally.setEntitlements(u, Entitlements(plan = "pro", status = SubscriptionStatus.ACTIVE))
        val e = tally.entitlements(u)
        assertEquals("pro", e.plan)
        assertEquals("subscription", e.accessReason)
        assertEquals(Rule.Flag(enabled = true), e.features["export"])
        assertEquals(Rule.Metered(limit = 100L, period = Period.MONTH, enforcement = Enforcement.HARD, offlineShare = 1.0), e.features["ai_chat"])
        assertTrue(tally.check(u, "export").allowed)
        assertEquals(100L, tally.check(u, "ai_chat").limit)

        assertThrows(TallyException.InvalidInput::class.java) {
            tally.setEntitlements(u, Entitlements(plan = "platinum", status = SubscriptionStatus.ACTIVE))
        }
        assertEquals("pro", tally.entitlements(u).plan, "rejected state changes nothing")
    }

    @Test
    fun `idempotent replay counts once`() {
        val u = tally.createLocalUser().id
        val meta = UsageMeta(idempotencyKey = "request-42")
        assertTrue(tally.consume(u, "ai_chat", 1L, meta).allowed)
        assertTrue(tally.consume(u, "ai_chat", 1L, meta).allowed)
        assertEquals(1L, tally.usage(u, "ai_chat").used)
        assertEquals(1L, tally.pendingEvents(u))
        assertEquals(EventStatus.Pending, tally.eventStatus(u, "request-42"))
        assertEquals(eventIdForKey("request-42"), eventIdForKey("request-42"))

        assertThrows(TallyException.IdempotencyConflict::class.java) { tally.consume(u, "ai_chat", 2L, meta) }
        assertEquals(1L, tally.usage(u, "ai_chat").used)

        val many = tally.consumeMany(u, listOf(ConsumeItem("notes", 5L), ConsumeItem("ai_chat", 1L, UsageMeta(idempotencyKey = "request-43"))))
        assertEquals(2, many.size)
        assertTrue(many.all { it.allowed })
        assertEquals(2L, tally.usage(u, "ai_chat").used)
    }

    @Test
    fun `one use with several meters is recorded all or none`() {
        val u = tally.createLocalUser().id
        tally.consume(u, "ai_chat", 2L)
        // The call limit has 1 left: a use asking 2 calls records neither of its items.
        val denied = tally.consumeItems(u, listOf(UseItem("notes", 5L), UseItem("ai_chat", 2L)), id = "call-1")
        assertFalse(denied.allowed)
        assertEquals(listOf(Reason.OK, Reason.LIMIT_REACHED), denied.decisions.map { it.reason })
        assertEquals(0L, tally.usage(u, "notes").used)
        assertEquals(1L, tally.pendingEvents(u))

        val items = listOf(UseItem("notes", 5L), UseItem("ai_chat", 1L))
        val use = tally.consumeItems(u, items, id = "call-2", metadataJson = """{"request": 2}""")
        assertTrue(use.allowed)
        assertFalse(use.duplicate)
        assertEquals(eventIdForKey("call-2"), use.useId)
        assertEquals(listOf(5L, 3L), use.decisions.map { it.used })
        val again = tally.consumeItems(u, items, id = "call-2", metadataJson = """{"request": 2}""")
        assertTrue(again.duplicate)
        assertEquals(use.decisions, again.decisions)
        assertThrows(TallyException.IdempotencyConflict::class.java) { tally.consumeItems(u, listOf(UseItem("notes", 5L)), id = "call-2") }
        assertThrows(TallyException.InvalidInput::class.java) { tally.consumeItems(u, listOf(UseItem("notes", 1L), UseItem("notes", 1L))) }
        assertEquals(3L, tally.pendingEvents(u), "one earlier use and two items")

        // A void of the use id cancels every item.
        tally.void(u, use.useId, "refund")
        assertEquals(0L, tally.usage(u, "notes").used)
        assertEquals(2L, tally.usage(u, "ai_chat").used)
        assertEquals(4L, tally.pendingEvents(u), "and one void event")
    }

    @Test
    fun `bad input is a TallyException of the right variant and changes nothing`() {
        val u = tally.createLocalUser("Ada").id
        tally.setSetting(u, "theme", "\"dark\"")

        val malformed = assertThrows(TallyException.InvalidInput::class.java) { tally.setSetting(u, "theme", "{not json") }
        assertTrue(malformed.message!!.contains("not valid JSON"), malformed.message)
        assertThrows(TallyException.InvalidInput::class.java) { tally.patchSettings(u, "[1, 2]") }
        assertEquals("\"dark\"", tally.setting(u, "theme"))

        assertThrows(TallyException.NotFound::class.java) { tally.consume("no-such-user", "ai_chat") }
        assertThrows(TallyException.NotFound::class.java) { tally.settings("no-such-user") }

        val tz = assertThrows(TallyException.InvalidInput::class.java) { tally.updateUser(u, UserUpdate(timezone = "Mars/Olympus_Mons")) }
        assertTrue(tz.message!!.contains("timezone"), tz.message)
        assertEquals("UTC", tally.user(u).timezone)

        // A negative amount is rejected, and nothing is recorded.
        assertThrows(TallyException.InvalidInput::class.java) { tally.consume(u, "ai_chat", -1L) }
        assertThrows(TallyException.InvalidInput::class.java) { tally.consume(u, "ai_chat", 0L) }
        assertThrows(TallyException.InvalidInput::class.java) { tally.consume(u, "ai_chat", 1L, UsageMeta(metadataJson = "{oops")) }
        assertEquals(0L, tally.pendingEvents(u))

        val cat = assertThrows(TallyException.InvalidCatalog::class.java) {
            tally.setCatalog("""{"plans": [{"id": "free", "features": {"api": {"type": "rate", "limit": -1, "window_secs": 60}}}]}""")
        }
        assertTrue(cat.message!!.contains("plans[0].features.api.limit"), cat.message)
        assertEquals(3L, tally.check(u, "ai_chat").limit, "the old catalog is still in use")

        assertThrows(TallyException.InvalidInput::class.java) { tally.report(u, 10, 5, GroupBy.DAY) }
        assertThrows(TallyException.InvalidInput::class.java) {
            Tally.openInMemory(TallyConfig(defaultSettingsJson = "42"))
        }
        // Every variant is a TallyException, so one catch handles them all.
        val any: TallyException = assertThrows(TallyException::class.java) { tally.user("nobody") }
        assertTrue(any is TallyException.NotFound)
    }

    @Test
    fun `report rows group by feature, model and day`() {
        val u = tally.createLocalUser().id
        tally.consume(u, "ai_chat", 1L, UsageMeta(model = "gpt-4o", inputTokens = 1000L, outputTokens = 500L))
        tally.consume(u, "notes", 4L)
        clock.set(Instant.parse("2025-03-11T09:00:00Z"))
        tally.consume(u, "notes", 1L, UsageMeta(metadataJson = """{"source": "widget"}"""))

        val from = Instant.parse("2025-03-01T00:00:00Z").toEpochMilli()
        val to = Instant.parse("2025-04-01T00:00:00Z").toEpochMilli()
        val byFeature = tally.report(u, from, to, GroupBy.FEATURE)
        assertEquals(
            listOf(
                ReportRow("ai_chat", 1L, 1L, 1000L, 500L, 7500L),
                ReportRow("notes", 2L, 5L, 0L, 0L, 0L),
            ),
            byFeature,
        )
        assertEquals(listOf("", "gpt-4o"), tally.report(u, from, to, GroupBy.MODEL).map { it.key })
        val byDay = tally.report(u, from, to, GroupBy.DAY)
        assertEquals(listOf("2025-03-10" to 2L, "2025-03-11" to 1L), byDay.map { it.key to it.events })
    }

    @Test
    fun `the changes Flow emits after a consume`() = runBlocking {
        val u = tally.createLocalUser().id
        val other = tally.createLocalUser().id
        val next = async(Dispatchers.Default, start = CoroutineStart.DEFAULT) {
            withTimeout(10_000) { tally.changes(u).first() }
        }
        withTimeout(10_000) { while (tally.changeCollectors() == 0) delay(5) }
        tally.consume(other, "ai_chat") // another user's change is filtered out
        tally.consume(u, "ai_chat")
        val change = next.await()
        assertEquals(u, change.userId)
        assertTrue(change.change.usage)

        // A settings write is reported as such, to every collector.
        val a = async(Dispatchers.Default) { withTimeout(10_000) { tally.changes().first() } }
        val b = async(Dispatchers.Default) { withTimeout(10_000) { tally.changes(u).first() } }
        withTimeout(10_000) { while (tally.changeCollectors() < 2) delay(5) }
        tally.setSetting(u, "fontSize", "16")
        assertTrue(a.await().change.settings)
        assertTrue(b.await().change.settings)
    }

    @Test
    fun `concurrent consumes from several threads count exactly`() {
        val u = tally.createLocalUser().id
        tally.setEntitlements(u, Entitlements(plan = "pro", status = SubscriptionStatus.ACTIVE))
        val pool = Executors.newFixedThreadPool(8)
        val start = CountDownLatch(1)
        val futures = (1..80).map { i ->
            pool.submit<Decision> {
                start.await()
                tally.consume(u, "ai_chat", 1L, UsageMeta(idempotencyKey = "k-${i % 40}"))
            }
        }
        start.countDown()
        val decisions = futures.map { it.get(30, TimeUnit.SECONDS) }
        pool.shutdown()
        assertTrue(decisions.all { it.allowed })
        assertEquals(40L, tally.usage(u, "ai_chat").used, "40 distinct keys, each counted once")
    }

    @Test
    fun `in-memory instances and misc accessors`() {
        val mem = Tally.openInMemory(TallyConfig(catalogJson = CATALOG))
        mem.use {
            val u = it.createLocalUser().id
            assertEquals(0L, it.creditBalance(u))
            assertNull(it.lastSyncedAtMs(u))
            assertNotNull(it.highestSeenTimeMs())
            assertTrue(it.catalogJson().contains("ai_chat"))
            validateCatalog(CATALOG)
            assertThrows(TallyException.InvalidCatalog::class.java) { validateCatalog("""{"plans": [{"id": "x", "features": {"f": {"type": "nope"}}}]}""") }
        }
    }
}
