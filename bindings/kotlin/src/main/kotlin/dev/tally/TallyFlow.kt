// Hand-written companion of the generated bindings (tally_ffi.kt): observe changes as a Flow.
package dev.tally

import java.util.Collections
import java.util.WeakHashMap
import java.util.concurrent.CopyOnWriteArrayList
import kotlinx.coroutines.channels.awaitClose
import kotlinx.coroutines.flow.Flow
import kotlinx.coroutines.flow.buffer
import kotlinx.coroutines.flow.callbackFlow
import kotlinx.coroutines.channels.BufferOverflow

/** A change of one user's data, as told by the library after it is committed. */
data class UserChange(val userId: String, val change: Change)

/**
 * The one [ChangeListener] registered per [Tally]; fans every change out to the collectors of
 * [changes]. The core keeps a single listener, so the Flow API goes through this hub.
 */
internal class ChangeHub : ChangeListener {
    val sinks = CopyOnWriteArrayList<(UserChange) -> Unit>()

    override fun onChange(userId: String, change: Change) {
        val event = UserChange(userId, change)
        for (sink in sinks) sink(event)
    }

    companion object {
        private val hubs = Collections.synchronizedMap(WeakHashMap<Tally, ChangeHub>())

        fun of(tally: Tally): ChangeHub = synchronized(hubs) {
            hubs.getOrPut(tally) { ChangeHub().also { tally.setListener(it) } }
        }
    }
}

/**
 * Changes of [userId]'s data (or of every user's when null): usage after a consume or a sync,
 * entitlements after a sign-in or a sync, settings after a write. A cold Flow: collection
 * starts listening, cancellation stops it; several collectors may listen at once.
 *
 * Changes are delivered without blocking the thread that made them; a slow collector loses the
 * oldest pending changes first (each one only says *what* changed: re-read the current state).
 *
 * Do not also call [Tally.setListener] yourself: it would replace the listener behind this Flow.
 */
fun Tally.changes(userId: String? = null): Flow<UserChange> {
    val hub = ChangeHub.of(this)
    return callbackFlow {
        val sink: (UserChange) -> Unit = { event ->
            if (userId == null || event.userId == userId) trySend(event)
        }
        hub.sinks.add(sink)
        awaitClose { hub.sinks.remove(sink) }
    }.buffer(capacity = 64, onBufferOverflow = BufferOverflow.DROP_OLDEST)
}

/** Number of collectors currently listening to [changes] on this instance. */
fun Tally.changeCollectors(): Int = ChangeHub.of(this).sinks.size
