package dev.tally;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertInstanceOf;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;
import static org.junit.jupiter.api.Assumptions.assumeTrue;

import java.nio.file.Path;
import java.util.List;
import java.util.UUID;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.TimeUnit;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/** A Java caller: the suspend calls through their CompletableFuture companions, against a real server. */
class JavaCallerTest {
    @TempDir
    Path dir;

    @BeforeAll
    static void server() {
        assumeTrue(TestServer.start(), "tally-server or PostgreSQL not available");
    }

    private SyncOptions options(String token) {
        return new SyncOptions(TestServer.getBaseUrl(), token, null, null, null, null, null, null, null, false);
    }

    @Test
    void syncsThroughAFutureAndFailsItWithTheTallyException() throws Exception {
        String sub = "java-" + UUID.randomUUID();
        TallyConfig config = new TallyConfig("java-phone", null, null, List.of(), TallyTestKt.CATALOG, null, null, null,
                TestServer.getKeys(), List.of(), null, null);
        try (Tally tally = Tally.Companion.open(dir.resolve("java.db").toString(), config)) {
            User user = tally.logIn(sub, null, null, null);
            tally.consume(user.getId(), "notes", 2L, null);

            SyncReport report = TallyFutures.syncAsync(tally, user.getId(), options(TestServer.idToken(sub))).get(60, TimeUnit.SECONDS);
            assertEquals(1L, report.getEventsAcked());
            assertEquals(0L, tally.pendingEvents(user.getId()));
            assertTrue(tally.currentCustomerInfo().getLastSyncedAtMs() != null);

            ExecutionException e = assertThrows(ExecutionException.class, () ->
                    TallyFutures.syncAsync(tally, user.getId(), options(TestServer.idToken(sub, "not-the-secret"))).get(60, TimeUnit.SECONDS));
            assertInstanceOf(TallyException.Unauthorized.class, e.getCause());
        }
    }
}
