// Hand-written: the suspend calls of the generated bindings as CompletableFutures, for Java
// callers (`TallyFutures.syncAsync(tally, userId, options).get()`). Cancelling a future cancels
// the call.
@file:JvmName("TallyFutures")

package dev.tally

import java.util.concurrent.CompletableFuture
import kotlinx.coroutines.CoroutineScope
import kotlinx.coroutines.Dispatchers
import kotlinx.coroutines.SupervisorJob
import kotlinx.coroutines.future.future

/** Where the futures' calls run (the calls themselves never block a thread). */
private val scope = CoroutineScope(SupervisorJob() + Dispatchers.Default)

/** [Tally.sync] as a future. */
fun Tally.syncAsync(userId: String, options: SyncOptions): CompletableFuture<SyncReport> =
    scope.future { sync(userId, options) }

/** [Tally.releaseLeases] as a future. */
fun Tally.releaseLeasesAsync(userId: String, options: SyncOptions): CompletableFuture<SyncReport> =
    scope.future { releaseLeases(userId, options) }

/** [Tally.submitPurchase] as a future. */
fun Tally.submitPurchaseAsync(userId: String, purchase: Purchase, options: SyncOptions): CompletableFuture<PurchaseReport> =
    scope.future { submitPurchase(userId, purchase, options) }

/** [Tally.restorePurchases] as a future. */
fun Tally.restorePurchasesAsync(userId: String, purchase: Purchase, options: SyncOptions): CompletableFuture<PurchaseReport> =
    scope.future { restorePurchases(userId, purchase, options) }
