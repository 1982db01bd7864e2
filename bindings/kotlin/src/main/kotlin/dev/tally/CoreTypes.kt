// Hand-written: the core's enums (generated in dev.tally.core, tally_core.kt) under dev.tally,
// so that apps need one package. (Only plain enums: Kotlin reaches a sealed class's variants
// only by its own name, so the ffi keeps SettingStatus and EventStatus in dev.tally itself.)
package dev.tally

/** Commit durability of the SQLite database. */
typealias Durability = dev.tally.core.Durability

/** Whether going over a limit denies (`HARD`) or records and flags (`SOFT`). */
typealias Enforcement = dev.tally.core.Enforcement

/** How report rows are grouped. */
typealias GroupBy = dev.tally.core.GroupBy

/** How often a limit resets. */
typealias Period = dev.tally.core.Period

/** Why a decision came out the way it did. */
typealias Reason = dev.tally.core.Reason

/** Subscription status, as the payment provider reports it (mapped). */
typealias SubscriptionStatus = dev.tally.core.SubscriptionStatus
