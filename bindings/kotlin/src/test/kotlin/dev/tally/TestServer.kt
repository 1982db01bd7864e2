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
import org.junit.jupiter.api.Assumptions.assumeTrue

/**
 * A real `tally-server` process on loopback with its embedded PostgreSQL in a temporary data
 * directory. Skips the calling test class, loudly, when the server binary is not built
 * (`cargo build -p tally-server`) or PostgreSQL is not installed — except under CI
 * (`CI=true` / `TALLY_REQUIRE_PG=1`), where a test that cannot run fails.
 */
class TestServer private constructor(private val process: Process, private val dataDir: Path, val baseUrl: String) : AutoCloseable {
    /** The server's token-signing keys (`GET /v1/keys`), for the device's `serverKeys`. */
    val keys: String = get("/v1/keys")

    /** A `GET` of `path` (a 200 answer's body). */
    fun get(path: String, bearer: String? = null): String = request("GET", path, bearer, null).let { (status, body) ->
        check(status == 200) { "GET $path: $status $body" }
        body
    }

    /** One request; its status and body. */
    fun request(method: String, path: String, bearer: String?, json: String?): Pair<Int, String> {
        val c = URI("$baseUrl$path").toURL().openConnection() as HttpURLConnection
        c.requestMethod = method
        c.connectTimeout = 2000
        c.readTimeout = 10_000
        bearer?.let { c.setRequestProperty("Authorization", "Bearer $it") }
        if (json != null) {
            c.doOutput = true
            c.setRequestProperty("Content-Type", "application/json")
            c.outputStream.use { it.write(json.toByteArray()) }
        }
        try {
            val stream = if (c.responseCode < 400) c.inputStream else c.errorStream
            return c.responseCode to (stream?.readBytes()?.decodeToString() ?: "")
        } finally {
            c.disconnect()
        }
    }

    /** Stops the server (SIGTERM: it stops its embedded PostgreSQL) and removes its data. */
    override fun close() {
        process.destroy()
        if (!process.waitFor(60, TimeUnit.SECONDS)) process.destroyForcibly().waitFor()
        dataDir.toFile().deleteRecursively()
    }

    companion object {
        /** The HS256 secret of the test identity provider. */
        const val SECRET = "kotlin-test-identity-secret"

        /** Starts a server with `catalog` and the extra `env`; see the class comment for skips. */
        fun start(catalog: String, env: Map<String, String> = emptyMap()): TestServer {
            val bin = File(System.getProperty("tally.server.bin").orEmpty().ifEmpty { "../../target/debug/tally-server" })
            // Under CI (CI=true / TALLY_REQUIRE_PG=1) a test that cannot run fails instead of skipping.
            val required = System.getenv("CI") == "true" || System.getenv("TALLY_REQUIRE_PG") == "1"
            check(bin.canExecute() || !required) { "tally-server is required here but ${bin.absolutePath} is not built" }
            if (!bin.canExecute()) System.err.println("\n!!!!! SKIPPING: ${bin.absolutePath} not built (cargo build -p tally-server) !!!!!\n")
            assumeTrue(bin.canExecute(), "tally-server binary not built")
            val dataDir = Files.createTempDirectory("tally-kotlin-server")
            // The embedded PostgreSQL runs as the `postgres` user when we are root: let it in.
            Files.setPosixFilePermissions(dataDir, PosixFilePermissions.fromString("rwxr-xr-x"))
            val plans = dataDir.resolve("plans.json").also { Files.writeString(it, catalog) }
            val port = ServerSocket(0).use { it.localPort }
            val baseUrl = "http://127.0.0.1:$port"
            val log = dataDir.resolve("server.log").toFile()
            val pb = ProcessBuilder(bin.absolutePath, "serve").redirectErrorStream(true).redirectOutput(log)
            pb.environment().apply {
                remove("TALLY_DATABASE_URL")
                put("TALLY_LISTEN", "127.0.0.1:$port")
                put("TALLY_DATA_DIR", dataDir.resolve("data").toString())
                put("TALLY_JWT_SECRET", SECRET)
                put("TALLY_PLANS_FILE", plans.toString())
                putAll(env)
            }
            val p = pb.start()
            val deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(120)
            while (System.nanoTime() < deadline) {
                if (!p.isAlive) {
                    val out = log.readText()
                    dataDir.toFile().deleteRecursively()
                    if (!required && out.contains("initdb", ignoreCase = true) && out.contains("not found", ignoreCase = true)) {
                        System.err.println("\n!!!!! SKIPPING: PostgreSQL binaries not installed !!!!!\n$out")
                        assumeTrue(false, "PostgreSQL not installed")
                    }
                    throw IllegalStateException("tally-server exited with ${p.exitValue()}:\n$out")
                }
                if (healthy(baseUrl)) return TestServer(p, dataDir, baseUrl)
                Thread.sleep(200)
            }
            p.destroyForcibly().waitFor()
            throw IllegalStateException("tally-server did not come up:\n${log.readText()}")
        }

        private fun healthy(baseUrl: String): Boolean = runCatching {
            val c = URI("$baseUrl/healthz").toURL().openConnection() as HttpURLConnection
            c.connectTimeout = 1000
            c.readTimeout = 2000
            try {
                c.responseCode == 200
            } finally {
                c.disconnect()
            }
        }.getOrDefault(false)

        /** An HS256 identity token of `sub` from the test identity provider. */
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
}
