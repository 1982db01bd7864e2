package dev.tally

import java.io.File
import java.net.HttpURLConnection
import java.net.ServerSocket
import java.net.URI
import java.nio.file.Files
import java.nio.file.Path
import java.nio.file.attribute.PosixFilePermissions
import java.util.Base64
import java.util.concurrent.TimeUnit
import javax.crypto.Mac
import javax.crypto.spec.SecretKeySpec

/**
 * One real `tally-server` process (embedded PostgreSQL in a temporary data dir) for the whole
 * test JVM (selling on Google Play through [google]), started by the first test class that needs
 * it and stopped at exit. Without the
 * server binary or PostgreSQL, [start] answers false (the caller skips, loudly), except under
 * CI (CI=true / TALLY_REQUIRE_PG=1), where it fails.
 */
object TestServer {
    const val SECRET = "kotlin-test-identity-secret"

    /** Under CI a test that cannot run fails instead of skipping. */
    @JvmStatic
    val required = System.getenv("CI") == "true" || System.getenv("TALLY_REQUIRE_PG") == "1"

    @JvmStatic
    var baseUrl = ""
        private set

    /** The server's `GET /v1/keys` (the devices' `serverKeys`). */
    @JvmStatic
    var keys = ""
        private set

    private var started: Boolean? = null

    /** The fake Google the server verifies Play purchases with (see [FakeGooglePlay]). */
    @JvmStatic
    val google: FakeGooglePlay by lazy { FakeGooglePlay() }

    /** Starts the server once; whether it runs. */
    @JvmStatic
    @Synchronized
    fun start(): Boolean {
        started?.let { return it }
        val up = launch()
        started = up
        return up
    }

    private fun launch(): Boolean {
        val bin = File(System.getProperty("tally.server.bin").orEmpty().ifEmpty { "../../target/debug/tally-server" })
        check(bin.canExecute() || !required) { "tally-server is required here but ${bin.absolutePath} is not built" }
        if (!bin.canExecute()) {
            System.err.println("\n!!!!! SKIPPING the server tests: ${bin.absolutePath} not built (cargo build -p tally-server) !!!!!\n")
            return false
        }
        val dataDir = Files.createTempDirectory("tally-kotlin-sync")
        // The embedded PostgreSQL runs as the `postgres` user when we are root: let it in.
        Files.setPosixFilePermissions(dataDir, PosixFilePermissions.fromString("rwxr-xr-x"))
        val plans = dataDir.resolve("plans.json").also { Files.writeString(it, CATALOG) }
        val port = ServerSocket(0).use { it.localPort }
        baseUrl = "http://127.0.0.1:$port"
        val log = dataDir.resolve("server.log").toFile()
        val pb = ProcessBuilder(bin.absolutePath, "serve").redirectErrorStream(true).redirectOutput(log)
        pb.environment().apply {
            remove("TALLY_DATABASE_URL")
            put("TALLY_LISTEN", "127.0.0.1:$port")
            put("TALLY_DATA_DIR", dataDir.resolve("data").toString())
            put("TALLY_JWT_SECRET", SECRET)
            put("TALLY_PLANS_FILE", plans.toString())
            putAll(google.env(dataDir))
        }
        val p = pb.start()
        Runtime.getRuntime().addShutdownHook(Thread { stop(p, dataDir) })
        val deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(120)
        while (System.nanoTime() < deadline) {
            if (!p.isAlive) {
                val out = log.readText()
                if (!required && out.contains("initdb", ignoreCase = true) && out.contains("not found", ignoreCase = true)) {
                    System.err.println("\n!!!!! SKIPPING the server tests: PostgreSQL binaries not installed !!!!!\n$out")
                    return false
                }
                throw IllegalStateException("tally-server exited with ${p.exitValue()}:\n$out")
            }
            if (runCatching { get("/healthz") }.isSuccess) break
            Thread.sleep(200)
        }
        check(runCatching { get("/healthz") }.isSuccess) { "tally-server did not come up:\n${log.readText()}" }
        keys = get("/v1/keys")
        return true
    }

    private fun stop(p: Process, dataDir: Path) {
        p.destroy() // SIGTERM: the server stops its embedded PostgreSQL
        if (!p.waitFor(60, TimeUnit.SECONDS)) p.destroyForcibly().waitFor()
        google.close()
        dataDir.toFile().deleteRecursively()
    }

    /** GET [path] on the server; the body of a 200. */
    @JvmStatic
    fun get(path: String, bearer: String? = null): String {
        val c = URI("$baseUrl$path").toURL().openConnection() as HttpURLConnection
        c.connectTimeout = 2000
        c.readTimeout = 5000
        bearer?.let { c.setRequestProperty("Authorization", "Bearer $it") }
        try {
            check(c.responseCode == 200) { "GET $path: ${c.responseCode}" }
            return c.inputStream.readBytes().decodeToString()
        } finally {
            c.disconnect()
        }
    }

    /** An HS256 identity token of [sub] from the test identity provider. */
    @JvmStatic
    @JvmOverloads
    fun idToken(sub: String, secret: String = SECRET): String {
        val b64 = Base64.getUrlEncoder().withoutPadding()
        val now = System.currentTimeMillis() / 1000
        val header = b64.encodeToString("""{"alg":"HS256","typ":"JWT"}""".toByteArray())
        val claims = b64.encodeToString(
            """{"sub":"$sub","iat":$now,"exp":${now + 3600},"email":"$sub@example.com","email_verified":true}""".toByteArray(),
        )
        val mac = Mac.getInstance("HmacSHA256").apply { init(SecretKeySpec(secret.toByteArray(), "HmacSHA256")) }
        val sig = b64.encodeToString(mac.doFinal("$header.$claims".toByteArray()))
        return "$header.$claims.$sig"
    }
}
