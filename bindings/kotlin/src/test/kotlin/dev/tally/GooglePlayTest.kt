package dev.tally

import java.nio.file.Path
import java.time.Instant
import java.time.temporal.ChronoUnit
import java.util.UUID
import kotlinx.coroutines.runBlocking
import org.junit.jupiter.api.Assertions.assertEquals
import org.junit.jupiter.api.Assertions.assertThrows
import org.junit.jupiter.api.Assertions.assertTrue
import org.junit.jupiter.api.Assumptions.assumeTrue
import org.junit.jupiter.api.BeforeAll
import org.junit.jupiter.api.Test
import org.junit.jupiter.api.io.TempDir

/**
 * An Android app selling through Google Play: the Kotlin library against the real
 * `tally-server` of [TestServer], which verifies purchase tokens with a fake Google on loopback
 * ([TestServer.google]).
 */
class GooglePlayTest {
    companion object {
        @BeforeAll
        @JvmStatic
        fun start() {
            assumeTrue(TestServer.start(), "tally-server or PostgreSQL not available")
        }
    }

    @TempDir
    lateinit var dir: Path

    private val g get() = TestServer.google

    private fun device(name: String): Tally =
        Tally.open(dir.resolve("$name.db").toString(), TallyConfig(deviceId = name, catalogJson = CATALOG, serverKeys = TestServer.keys))

    private fun options(sub: String) = SyncOptions(serverUrl = TestServer.baseUrl, token = TestServer.idToken(sub))

    private fun play(vararg items: Pair<String, String>) = Purchase.Google(purchases = items.map { GooglePurchase(it.first, it.second) })

    @Test
    fun `a Play subscription bought with the account token unlocks pro offline and is acknowledged once`() = runBlocking {
        val sub = "play-${UUID.randomUUID()}"
        device("pixel").use { p ->
            val u = p.signIn(Profile(externalId = sub)).id
            p.sync(u, options(sub))
            // The app passes this to BillingFlowParams.setObfuscatedAccountId.
            val account = p.accountToken(u)
            val token = "tok-${UUID.randomUUID()}"
            g.subscriptions[token] =
                FakeGooglePlay.subscription("pro_monthly", "SUBSCRIPTION_STATE_ACTIVE", Instant.now().plus(30, ChronoUnit.DAYS), account, "GPA.1-0")

            val report = p.submitPurchase(u, play("pro_monthly" to token), options(sub))
            assertEquals(listOf(PurchaseOutcome("play", "pro_monthly", token, "active")), report.purchases)
            assertTrue(report.entitlementsUpdated)
            assertEquals("pro", p.entitlements(u).plan)
            assertTrue(p.check(u, "export").allowed, "the signed token applies offline")
            assertEquals(listOf("pro_monthly:$token"), g.acknowledged.filter { it.endsWith(token) })

            // The app retries (it was killed before it heard the answer): same outcome, acknowledged once.
            val again = p.submitPurchase(u, play("pro_monthly" to token), options(sub))
            assertEquals(report.purchases, again.purchases)
            assertEquals(1, g.acknowledged.count { it.endsWith(token) })

            // Restoring on a second device of the same account lists the subscription.
            device("pixel-2").use { q ->
                val u2 = q.signIn(Profile(externalId = sub)).id
                val restored = q.restorePurchases(u2, play("pro_monthly" to token), options(sub))
                assertEquals("active", restored.purchases.single().status)
                assertEquals("pro", q.entitlements(u2).plan)
            }
            val billing = TestServer.get("/v1/billing", TestServer.idToken(sub))
            assertTrue(billing.contains("\"store\":\"play\""), billing)
        }
    }

    @Test
    fun `a credit pack is granted once and consumed, and refusals name the server's code and change nothing`() = runBlocking {
        val sub = "play-${UUID.randomUUID()}"
        val other = "play-other-${UUID.randomUUID()}"
        device("pixel-credits").use { p ->
            val u = p.signIn(Profile(externalId = sub)).id
            p.sync(u, options(sub))
            val account = p.accountToken(u)
            val pack = "pack-${UUID.randomUUID()}"
            g.products["credits_100:$pack"] = FakeGooglePlay.product(0, account, "GPA.2-0")
            val r = p.submitPurchase(u, play("credits_100" to pack), options(sub))
            assertEquals("credited", r.purchases.single().status)
            assertEquals(100L, p.entitlements(u).creditBalance.toLong())
            assertEquals(listOf("credits_100:$pack"), g.consumed.filter { it.endsWith(pack) })
            p.submitPurchase(u, play("credits_100" to pack), options(sub))
            assertEquals(100L, p.entitlements(u).creditBalance.toLong(), "one order grants once")

            // Bound to another account, unknown to Google, an unknown product: refused with the code.
            device("pixel-other").use { o ->
                val uo = o.signIn(Profile(externalId = other)).id
                o.sync(uo, options(other))
                val before = o.entitlements(uo)
                val cases = listOf(
                    play("credits_100" to pack) to "bound_to_other_user",
                    play("pro_monthly" to "nobody-knows-${UUID.randomUUID()}") to "unknown_purchase_token",
                    play("gold_monthly" to pack) to "unknown_product",
                )
                for ((purchase, code) in cases) {
                    val e = assertThrows(TallyException.PurchaseRefused::class.java) {
                        runBlocking { o.submitPurchase(uo, purchase, options(other)) }
                    }
                    assertTrue(e.message!!.contains(code), "$code: ${e.message}")
                    assertEquals(before, o.entitlements(uo), "$code changed the entitlements")
                }
                assertThrows(TallyException.InvalidInput::class.java) {
                    runBlocking { o.submitPurchase(uo, Purchase.Google(purchases = emptyList()), options(other)) }
                }
            }
            assertEquals(1, g.consumed.count { it.endsWith(pack) }, "nothing refused was consumed again")
        }
    }
}
