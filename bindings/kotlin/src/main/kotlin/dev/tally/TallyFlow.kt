// Hand-written companion of the generated bindings (tally_ffi.kt): changes and the customer's
// state as Flows, the current user as a property. Thin: the state is computed by the library.
package dev.tally

import kotlinx.coroutines.channels.BufferOverflow
import kotlinx.coroutines.channels.awaitClose
import kotlinx.coroutines.flow.Flow
import kotlinx.coroutines.flow.buffer
import kotlinx.coroutines.flow.callbackFlow
import kotlinx.coroutines.flow.conflate
import kotlinx.coroutines.flow.distinctUntilChanged

/**
 * Changes of [userId]'s data (or of every user's when null), each with the user's
 * [CustomerInfo] after it (`info`): usage after a consume or a sync, entitlements after a
 * sign-in or a sync, settings after a write. A cold Flow: collection adds an observer,
 * cancellation removes it; any number of collectors and [Tally.setListener] work side by side.
 *
 * Changes are delivered without blocking the thread that made them; a slow collector loses the
 * oldest pending changes first (each carries the whole state, so the newest is enough).
 */
fun Tally.changes(userId: String? = null): Flow<UserChange> = callbackFlow {
    val id = addObserver(object : ChangeObserver {
        override fun onUserChange(change: UserChange) {
            if (userId == null || change.userId == userId) trySend(change)
        }
    })
    awaitClose { removeObserver(id) }
}.buffer(capacity = 64, onBufferOverflow = BufferOverflow.DROP_OLDEST)

/**
 * The state of [userId], or of the current user when null (following [Tally.logIn] and
 * [Tally.logOut]): the state now, then after every change. Conflated: a slow collector gets
 * the newest state.
 */
fun Tally.customerInfoFlow(userId: String? = null): Flow<CustomerInfo> = callbackFlow {
    val id = addObserver(object : ChangeObserver {
        override fun onUserChange(change: UserChange) {
            val info = change.info ?: return
            if (if (userId == null) change.isCurrentUser else change.userId == userId) trySend(info)
        }
    })
    trySend(if (userId == null) currentCustomerInfo() else customerInfo(userId))
    awaitClose { removeObserver(id) }
}.conflate().distinctUntilChanged()

/** Number of observers currently registered ([changes] and [customerInfoFlow] collectors included). */
fun Tally.changeCollectors(): Int = observerCount().toInt()

/** The current user (see [Tally.currentUser]): the signed-in account, else the anonymous user. */
val Tally.currentUser: User get() = currentUser()

/** Whether the plan in effect lets the user use [feature] (limits still apply; see `features`). */
fun CustomerInfo.isEntitled(feature: String): Boolean = features[feature]?.entitled == true

/** The status of this helper now, then at every change. Conflated: the newest status wins. */
fun AutoSync.statusFlow(): Flow<SyncStatus> = callbackFlow {
    val id = addStatusListener(object : SyncStatusListener {
        override fun onStatus(status: SyncStatus) {
            trySend(status)
        }
    })
    trySend(status())
    awaitClose { removeStatusListener(id) }
}.conflate().distinctUntilChanged()
