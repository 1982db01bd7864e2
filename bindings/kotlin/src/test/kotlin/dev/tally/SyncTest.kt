package dev.tally

import java.net.HttpURLConnection
import java.net.ServerSocket
import java.net.URI
import java.nio.file.Path
import java.util.UUID
import kotlinx.coroutines.Dispatchers
import kotlinx.coroutines.async
import kotlinx.coroutines.delay
import kotlinx.coroutines.flow.filter
import kotlinx.coroutines.flow.first
import kotlinx.coroutines.runBlocking
import kotlinx.coroutines.withTimeout
import org.junit.jupiter.api.Assertions.assertEquals
import org.junit.jupiter.api.Assertions.assertNotNull
import org.junit.jupiter.api.Assertions.assertNull
import org.junit.jupiter.api.Assertions.assertThrows
import org.junit.jupiter.api.Assertions.assertTrue
import org.junit.jupiter.api.Assumptions.assumeTrue
import org.junit.jupiter.api.BeforeAll
import org.junit.jupiter.api.Test
import org.junit.jupiter.api.io.TempDir

/**
 * `sync` against a real `tally-server` process ([TestServer]). Skipped, loudly, when the server
 * binary is not built (`cargo build -p tally-server`) or PostgreSQL is not installed; under CI
 * it fails instead.
 */
class SyncTest {
    companion object {
        private var baseUrl = ""
        private var keys = ""

        @BeforeAll
        @JvmStatic
        fun startServer() {
            assumeTrue(TestServer.start(), "tally-server or PostgreSQL not available")
            baseUrl = TestServer.baseUrl
            keys = TestServer.keys
        }

        /** An HS256 identity token from the test identity provider. */
        fun idToken(sub: String, secret: String = TestServer.SECRET): String = TestServer.idToken(sub, secret)
    }

    @TempDir
    lateinit var dir: Path

    private fun device(name: String): Tally = Tally.open(
        dir.resolve("$name.db").toString(),
        TallyConfig(deviceId = name, catalogJson = CATALOG, serverKeys = keys, localOnlySettings = listOf("theme")),
    )

    private fun options(sub: String) = SyncOptions(serverUrl = baseUrl, token = idToken(sub))

    @Test
    fun `two devices sync through a real server and converge`() = runBlocking {
        val sub = "kotlin-${UUID.randomUUID()}"
        device("phone").use { a ->
            device("laptop").use { b ->
                val ua = a.signIn(Profile(externalId = sub)).id
                val ub = b.signIn(Profile(externalId = sub)).id
                a.consume(ua, "ai_chat", 1L, UsageMeta(idempotencyKey = "a-1"))
                a.consume(ua, "ai_chat", 1L, UsageMeta(idempotencyKey = "a-2"))
                a.setSetting(ua, "fontSize", "18")
                a.setSetting(ua, "theme", "\"dark\"") // local-only: never synced

                val r1 = a.sync(ua, options(sub))
                assertEquals(2L, r1.eventsSent)
                assertEquals(2L, r1.eventsAcked)
                assertEquals(0L, r1.duplicates)
                assertTrue(r1.rejected.isEmpty())
                assertEquals(1L, r1.settingsSent)
                assertTrue(r1.rounds >= 1L)
                assertTrue(r1.entitlementsUpdated, "the device got a signed entitlements token")
                assertEquals(0L, a.pendingEvents(ua))
                assertEquals(EventStatus.Settled, a.eventStatus(ua, "a-1"))
                assertNotNull(a.lastSyncedAtMs(ua))

                b.consume(ub, "ai_chat")
                val r2 = b.sync(ub, options(sub))
                assertEquals(1L, r2.eventsAcked)
                assertEquals(1L, r2.settingsReceived)
                assertEquals(3L, b.usage(ub, "ai_chat").used, "server total includes the other device")
                assertEquals("18", b.setting(ub, "fontSize"))
                assertEquals(null, b.setting(ub, "theme"))

                a.sync(ua, options(sub))
                assertEquals(3L, a.usage(ua, "ai_chat").used)
                assertEquals(Reason.LIMIT_REACHED, a.check(ua, "ai_chat").reason)

                val again = a.sync(ua, options(sub))
                assertEquals(0L, again.eventsSent, "nothing left to send")
                assertEquals(3L, a.usage(ua, "ai_chat").used)
            }
        }
    }

    @Test
    fun `two devices split one hard limit offline and never overshoot it`() = runBlocking {
        val sub = "kotlin-${UUID.randomUUID()}"
        device("lease-a").use { a ->
            device("lease-b").use { b ->
                val ua = a.signIn(Profile(externalId = sub)).id
                val ub = b.signIn(Profile(externalId = sub)).id
                // Both apps mean to chat offline: each claims the pool (a device that never asked
                // for a feature and never used it holds none of its room).
                a.prepareOffline(ua, "ai_chat", 3L)
                b.prepareOffline(ub, "ai_chat", 3L)
                // Online twice each: the first device gives back (recall) what the second's share needs.
                repeat(2) {
                    a.sync(ua, options(sub))
                    b.sync(ub, options(sub))
                }
                val held = listOf(a.usage(ua, "ai_chat").deviceRemaining, b.usage(ub, "ai_chat").deviceRemaining)
                assertTrue(held.all { it != null && it >= 1L }, "both devices hold a slice of the limit of 3: $held")
                assertTrue(held.sumOf { it ?: 0L } <= 3L, "never more than the limit between them: $held")
                val lease = a.leases(ua).single { it.feature == "ai_chat" }
                assertEquals(held[0], lease.remaining)
                assertTrue(lease.leaseUntilMs != null && lease.leaseUntilMs!! > System.currentTimeMillis())

                // Offline: each spends its slice; then the lease, not the account, says no.
                var spent = 0L
                for ((t, u) in listOf(a to ua, b to ub)) {
                    while (true) {
                        val d = t.consume(u, "ai_chat")
                        if (!d.allowed) {
                            assertEquals(Reason.LEASE_EXHAUSTED, d.reason, "the account still has room: $d")
                            assertEquals(0L, d.deviceRemaining)
                            break
                        }
                        spent++
                    }
                }
                assertTrue(spent <= 3L, "spent $spent of 3")

                // Back online: counted once; a void gives the unit back to this device's slice.
                a.consume(ua, "notes", 1L, UsageMeta(idempotencyKey = "to-void"))
                a.void(ua, "to-void", "test")
                a.void(ua, "to-void", "test") // twice: nothing more
                assertThrows(TallyException::class.java) { a.void(ua, "no-such-use", null) }
                a.sync(ua, options(sub))
                b.sync(ub, options(sub))
                a.sync(ua, options(sub))
                assertEquals(spent, a.usage(ua, "ai_chat").used, "every use counted once")
                assertEquals(0L, a.usage(ua, "notes").used, "the voided use stopped counting")

                // Before a flight: ask for more; the room not held by the other device is granted.
                assertThrows(TallyException::class.java) { a.prepareOffline(ua, "ai_chat", 0L) }
                a.prepareOffline(ua, "ai_chat", 3L)
                a.sync(ua, options(sub))
                val other = b.usage(ub, "ai_chat").deviceRemaining ?: 0L
                assertEquals(3L - spent - other, a.usage(ua, "ai_chat").deviceRemaining)

                // Signing out: every slice goes back in a final sync, and the other device can use it.
                a.releaseLeases(ua, options(sub))
                b.prepareOffline(ub, "ai_chat", 3L)
                b.sync(ub, options(sub))
                assertEquals(3L - spent, b.usage(ub, "ai_chat").deviceRemaining)
            }
        }
    }

    @Test
    fun `purchases are suspend calls bound to the account token, and a refusal names the server's code`() = runBlocking {
        val sub = "kotlin-${UUID.randomUUID()}"
        device("store-phone").use { p ->
            val u = p.signIn(Profile(externalId = sub)).id
            assertThrows(TallyException.InvalidInput::class.java) { p.accountToken(u) }
            p.sync(u, options(sub))
            val account = p.accountToken(u)
            val me = URI("$baseUrl/v1/me").toURL().openConnection() as HttpURLConnection
            me.setRequestProperty("Authorization", "Bearer ${idToken(sub)}")
            assertTrue(me.inputStream.readBytes().decodeToString().contains("\"id\":\"$account\""), "the account token is the server's user id")

            // This server sells nothing on the App Store: refused with its code, nothing changes.
            val before = p.entitlements(u)
            val e = assertThrows(TallyException.PurchaseRefused::class.java) {
                runBlocking { p.submitPurchase(u, Purchase.Apple(signedTransactions = listOf("eyJhbGciOiJFUzI1NiJ9.e30.c2ln")), options(sub)) }
            }
            assertTrue(e.message!!.contains("store_unconfigured"), e.message)
            assertEquals(before, p.entitlements(u))
            assertEquals(account, p.accountToken(u))
            assertThrows(TallyException.InvalidInput::class.java) {
                runBlocking { p.submitPurchase(u, Purchase.Apple(signedTransactions = emptyList()), options(sub)) }
            }

            // Restoring with no transaction asks the server for a freshly signed token.
            val restored = p.restorePurchases(u, Purchase.Apple(signedTransactions = emptyList()), options(sub))
            assertTrue(restored.entitlementsUpdated)
            assertTrue(restored.purchases.isEmpty())
        }
    }

    @Test
    fun `the changes Flow reports a sync`() = runBlocking {
        val sub = "kotlin-${UUID.randomUUID()}"
        device("tablet").use { t ->
            val u = t.signIn(Profile(externalId = sub)).id
            t.consume(u, "notes", 3L)
            val change = async(Dispatchers.Default) { withTimeout(30_000) { t.changes(u).filter { it.change.usage }.first() } }
            withTimeout(10_000) { while (t.changeCollectors() == 0) delay(5) }
            t.sync(u, options(sub))
            assertEquals(u, change.await().userId)
        }
    }

    @Test
    fun `auto-sync uploads after a change, reports its status as a Flow and stops on Unauthorized`() = runBlocking {
        val sub = "kotlin-${UUID.randomUUID()}"
        device("auto-phone").use { p ->
            val u = p.logIn(sub).id
            p.startAutoSync(AutoSyncOptions(sync = options(sub), intervalMs = 600_000L, debounceMs = 50L)).use { auto ->
                // The first round runs at once.
                val first = withTimeout(60_000) { auto.statusFlow().first { it.lastSyncedAtMs != null && !it.uploading } }
                assertTrue(first.running)
                assertEquals(u, first.userId)
                assertNull(first.lastError)
                // A change goes out after the debounce, not after the ten-minute interval.
                p.consume(u, "notes", 1L)
                val after = withTimeout(60_000) {
                    auto.statusFlow().first { !it.uploading && it.pending == 0L && it.lastSyncedAtMs!! > first.lastSyncedAtMs!! }
                }
                assertEquals(0L, after.consecutiveFailures)
                assertEquals(0L, p.pendingEvents(u))
            }
            // The server counted it: another device of the account sees the use.
            device("auto-laptop").use { l ->
                val lu = l.signIn(Profile(externalId = sub)).id
                l.sync(lu, options(sub))
                assertEquals(1L, l.usage(lu, "notes").used)
            }
            // A token the server refuses stops the helper, which says why.
            val refused = SyncOptions(serverUrl = baseUrl, token = idToken(sub, secret = "not-the-secret"))
            p.startAutoSync(AutoSyncOptions(sync = refused, intervalMs = 600_000L)).use { auto ->
                val stopped = withTimeout(60_000) { auto.statusFlow().first { !it.running } }
                assertEquals("Unauthorized", stopped.lastErrorKind)
                assertEquals(1L, stopped.consecutiveFailures)
            }
        }
    }

    @Test
    fun `sync errors arrive as TallyException variants and keep the events`() = runBlocking {
        val sub = "kotlin-${UUID.randomUUID()}"
        device("watch").use { w ->
            val u = w.signIn(Profile(externalId = sub)).id
            w.consume(u, "notes")
            assertThrows(TallyException.Unauthorized::class.java) {
                runBlocking { w.sync(u, SyncOptions(serverUrl = baseUrl, token = idToken(sub, secret = "not-the-secret"))) }
            }
            val closedPort = ServerSocket(0).use { it.localPort }
            assertThrows(TallyException.Network::class.java) {
                runBlocking { w.sync(u, SyncOptions(serverUrl = "http://127.0.0.1:$closedPort", token = idToken(sub), maxAttempts = 1L, timeoutMs = 2000L)) }
            }
            assertEquals(1L, w.pendingEvents(u), "a failed sync loses nothing")
            assertEquals(1L, w.sync(u, options(sub)).eventsAcked)
            assertEquals(0L, w.pendingEvents(u))
        }
    }
}
