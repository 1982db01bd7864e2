package dev.tally

import com.sun.jna.NativeLibrary
import java.nio.file.Path
import java.util.concurrent.CopyOnWriteArrayList
import kotlinx.coroutines.Dispatchers
import kotlinx.coroutines.async
import kotlinx.coroutines.delay
import kotlinx.coroutines.launch
import kotlinx.coroutines.flow.filter
import kotlinx.coroutines.flow.first
import kotlinx.coroutines.runBlocking
import kotlinx.coroutines.withTimeout
import org.junit.jupiter.api.AfterEach
import org.junit.jupiter.api.Assertions.assertEquals
import org.junit.jupiter.api.Assertions.assertFalse
import org.junit.jupiter.api.Assertions.assertNotEquals
import org.junit.jupiter.api.Assertions.assertNotNull
import org.junit.jupiter.api.Assertions.assertNull
import org.junit.jupiter.api.Assertions.assertThrows
import org.junit.jupiter.api.Assertions.assertTrue
import org.junit.jupiter.api.BeforeEach
import org.junit.jupiter.api.Test
import org.junit.jupiter.api.io.TempDir

/** The app-facing API: the current user, CustomerInfo in the change stream, several observers, the packaged library. */
class NativeApiTest {
    @TempDir
    lateinit var dir: Path

    private lateinit var tally: Tally

    @BeforeEach
    fun setUp() {
        tally = Tally.open(dir.resolve("app.db").toString(), TallyConfig(catalogJson = CATALOG))
    }

    @AfterEach
    fun tearDown() {
        tally.close()
    }

    @Test
    fun `the library loads from the jar's own resources, without jna library path`() {
        assertNull(System.getProperty("jna.library.path"), "the tests run without jna.library.path")
        val resource = Tally::class.java.classLoader.getResource("linux-x86-64/libtally_ffi.so")
        assertNotNull(resource, "the jar carries linux-x86-64/libtally_ffi.so")
        val bytes = resource!!.openStream().use { it.readBytes() }
        assertTrue(bytes.size < 40 shl 20, "a stripped build, not an unstripped one: ${bytes.size} bytes")
        assertFalse(String(bytes, Charsets.ISO_8859_1).contains(".symtab"), "stripped: no symbol table")
        assertTrue(tally.deviceId().isNotEmpty())
        val loaded = NativeLibrary.getInstance("tally_ffi").file
        assertTrue(
            loaded.path.endsWith("linux-x86-64/libtally_ffi.so") || loaded.name.startsWith("jna"),
            "loaded from the classpath (or JNA's copy of it): $loaded",
        )
    }

    @Test
    fun `the current user starts anonymous, logs in with its data and logs out`() {
        val anon = tally.currentUser
        assertNull(anon.externalId)
        assertEquals(anon.id, tally.currentUser.id, "the same anonymous user until a log-in")
        tally.consume(anon.id, "ai_chat", 2L)

        val ada = tally.logIn("auth0|ada", email = "ada@example.com")
        assertEquals("auth0|ada", ada.externalId)
        assertEquals(ada.id, tally.currentUser.id, "no id to swap in by hand")
        assertEquals(2L, tally.currentCustomerInfo().features["ai_chat"]!!.usage.used, "the anonymous uses came along")
        assertThrows(TallyException.InvalidInput::class.java) { tally.logIn("") }
        assertEquals(ada.id, tally.currentUser.id, "a bad log-in changed nothing")

        val next = tally.logOut()
        assertNull(next.externalId)
        assertNotEquals(anon.id, next.id)
        assertEquals(next.id, tally.currentUser.id)
        // The multi-user API still sees both.
        assertEquals(setOf(ada.id, next.id), tally.users().map { it.id }.toSet())
        assertFalse(tally.user(ada.id).signedIn)
    }

    @Test
    fun `CustomerInfo answers is pro active, what is left, and what was bought`() {
        val u = tally.currentUser.id
        val free = tally.currentCustomerInfo()
        assertEquals("free", free.plan)
        assertFalse(free.entitlements["pro"]!!.isActive)
        assertTrue(free.entitlements["free"]!!.isActive)
        assertFalse(free.isEntitled("export"), "a disabled flag")
        val left: Long = free.features["ai_chat"]!!.usage.remaining!!
        assertTrue(left > 0, "signed integers: plain comparisons compile")

        val end = System.currentTimeMillis() + 30L * 86_400_000
        tally.setEntitlements(
            u,
            Entitlements(
                plan = "pro",
                status = SubscriptionStatus.ACTIVE,
                periodEndMs = end,
                creditGrants = listOf(CreditGrant("pack-1", 40L, null, "purchase")),
            ),
        )
        val pro = tally.currentCustomerInfo()
        assertTrue(pro.entitlements["pro"]!!.isActive)
        assertEquals(end, pro.entitlements["pro"]!!.expiresAtMs)
        assertEquals(end, pro.expiresAtMs)
        assertTrue(pro.isEntitled("export"))
        assertEquals(100L, pro.features["ai_chat"]!!.usage.limit)
        assertEquals(40L, pro.creditBalance)
        assertEquals(listOf(PurchaseKind.SUBSCRIPTION, PurchaseKind.CREDITS), pro.activePurchases.map { it.kind })
    }

    @Test
    fun `the change Flow carries the new state, and customerInfoFlow follows the current user`() = runBlocking {
        val u = tally.currentUser.id
        val next = async(Dispatchers.Default) { withTimeout(10_000) { tally.changes(u).filter { it.change.usage }.first() } }
        withTimeout(10_000) { while (tally.changeCollectors() == 0) delay(5) }
        tally.consume(u, "ai_chat")
        val change = next.await()
        val info = change.info!!
        assertEquals(1L, info.features["ai_chat"]!!.usage.used, "no re-read needed")
        assertEquals(1L, info.pendingEvents)
        assertTrue(change.isCurrentUser)

        // The current user's state: now, after a use, and after logging in (a new user id).
        val seen = CopyOnWriteArrayList<CustomerInfo>()
        val job = launch(Dispatchers.Default) { tally.customerInfoFlow().collect { seen.add(it) } }
        withTimeout(10_000) { while (seen.isEmpty()) delay(5) }
        assertEquals(1L, seen[0].features["ai_chat"]!!.usage.used)
        tally.consume(u, "ai_chat")
        withTimeout(10_000) { while (seen.none { it.features["ai_chat"]!!.usage.used == 2L }) delay(5) }
        val ada = tally.logIn("auth0|ada-flow")
        val moved = withTimeout(10_000) {
            while (seen.none { it.user.id == ada.id }) delay(5)
            seen.first { it.user.id == ada.id }
        }
        assertEquals(2L, moved.features["ai_chat"]!!.usage.used, "the Flow moved to the logged-in account, uses included")
        job.cancel()
    }

    @Test
    fun `two Flow collectors and an app listener are all told, none replacing another`() = runBlocking {
        val u = tally.currentUser.id
        val heard = CopyOnWriteArrayList<Change>()
        tally.setListener(object : ChangeListener {
            override fun onChange(userId: String, change: Change) {
                heard.add(change)
            }
        })
        val a = async(Dispatchers.Default) { withTimeout(10_000) { tally.changes(u).first() } }
        val b = async(Dispatchers.Default) { withTimeout(10_000) { tally.changes().first() } }
        withTimeout(10_000) { while (tally.changeCollectors() < 2) delay(5) }
        tally.setSetting(u, "fontSize", "16")
        assertTrue(a.await().change.settings)
        assertTrue(b.await().change.settings)
        assertEquals(1, heard.size, "the listener set after the Flows still hears")
        withTimeout(10_000) { while (tally.changeCollectors() > 0) delay(5) }
        tally.clearListener()
        tally.setSetting(u, "fontSize", "17")
        assertEquals(1, heard.size)
    }
}
