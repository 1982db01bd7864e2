package dev.tally

import com.sun.net.httpserver.HttpExchange
import com.sun.net.httpserver.HttpServer
import java.net.InetSocketAddress
import java.net.URLDecoder
import java.nio.file.Files
import java.nio.file.Path
import java.security.KeyFactory
import java.security.Signature
import java.security.spec.X509EncodedKeySpec
import java.time.Instant
import java.util.Base64
import java.util.concurrent.ConcurrentHashMap
import java.util.concurrent.CopyOnWriteArrayList

/**
 * A fake Google on 127.0.0.1, at the network boundary only: the OAuth2 token endpoint (it
 * checks the service account's RS256-signed JWT assertion against the account's public key),
 * and the Play Developer API's `purchases.subscriptionsv2.get`, `purchases.products.get`,
 * `:acknowledge` and `:consume`, answering only access tokens it issued. The test keys are the
 * server's Google fixtures (`server/tests/fixtures/google`).
 */
class FakeGooglePlay : AutoCloseable {
    private val http = HttpServer.create(InetSocketAddress("127.0.0.1", 0), 0)

    /** `http://127.0.0.1:port`. */
    val base = "http://127.0.0.1:${http.address.port}"

    /** `subscriptionsv2` resources (JSON) by purchase token. */
    val subscriptions = ConcurrentHashMap<String, String>()

    /** `products` resources (JSON) by "product:token". */
    val products = ConcurrentHashMap<String, String>()

    /** "product:token" of every acknowledged subscription and product, in order. */
    val acknowledged = CopyOnWriteArrayList<String>()

    /** "product:token" of every consumed product, in order. */
    val consumed = CopyOnWriteArrayList<String>()

    private val issued = CopyOnWriteArrayList<String>()

    init {
        http.createContext("/token") { ex -> ex.closing { token(it) } }
        http.createContext("/androidpublisher/v3/applications/") { ex -> ex.closing { api(it) } }
        http.start()
    }

    /** Writes a service-account key file whose `token_uri` points at this fake. */
    fun serviceAccountFile(dir: Path): Path = dir.resolve("service-account.json").also {
        val key = fixture("test-service-account-key.pem").replace("\n", "\\n")
        Files.writeString(
            it,
            """{"type":"service_account","project_id":"example-project","private_key_id":"test-sa-key-1",""" +
                """"private_key":"$key","client_email":"$SA_EMAIL","token_uri":"$base/token"}""",
        )
    }

    /** The server's environment pointing at this fake, with the service-account file in `dir`. */
    fun env(dir: Path): Map<String, String> = mapOf(
        "TALLY_GOOGLE_SERVICE_ACCOUNT_FILE" to serviceAccountFile(dir).toString(),
        "TALLY_GOOGLE_PACKAGE_NAME" to PACKAGE,
        "TALLY_GOOGLE_API_BASE" to base,
    )

    override fun close() = http.stop(0)

    private fun token(ex: HttpExchange) {
        val form = ex.requestBody.readBytes().decodeToString().split('&').associate {
            val (k, v) = it.split('=', limit = 2) + listOf("")
            URLDecoder.decode(k, Charsets.UTF_8) to URLDecoder.decode(v, Charsets.UTF_8)
        }
        val assertion = form["assertion"].orEmpty()
        if (form["grant_type"] != "urn:ietf:params:oauth:grant-type:jwt-bearer" || !validAssertion(assertion)) {
            return ex.answer(400, """{"error":"invalid_grant","error_description":"bad assertion"}""")
        }
        val t = "ya29.fake-${issued.size + 1}"
        issued += t
        ex.answer(200, """{"access_token":"$t","expires_in":3599,"token_type":"Bearer"}""")
    }

    private fun validAssertion(jwt: String): Boolean {
        val parts = jwt.split('.')
        if (parts.size != 3) return false
        val pem = fixture("test-service-account-pub.pem").lines().filter { !it.startsWith("-----") }.joinToString("")
        val key = KeyFactory.getInstance("RSA").generatePublic(X509EncodedKeySpec(Base64.getDecoder().decode(pem)))
        val verifier = Signature.getInstance("SHA256withRSA").apply {
            initVerify(key)
            update("${parts[0]}.${parts[1]}".toByteArray())
        }
        if (!runCatching { verifier.verify(Base64.getUrlDecoder().decode(parts[2])) }.getOrDefault(false)) return false
        val claims = Base64.getUrlDecoder().decode(parts[1]).decodeToString()
        val exp = Regex("\"exp\":(\\d+)").find(claims)?.groupValues?.get(1)?.toLong() ?: 0
        return claim(claims, "iss") == SA_EMAIL && claim(claims, "aud") == "$base/token" &&
            claim(claims, "scope") == "https://www.googleapis.com/auth/androidpublisher" && exp > Instant.now().epochSecond
    }

    private fun api(ex: HttpExchange) {
        val bearer = ex.requestHeaders.getFirst("Authorization")?.removePrefix("Bearer ").orEmpty()
        if (bearer !in issued) return ex.answer(401, error(401, "Request had invalid authentication credentials."))
        // applications/{package}/purchases/{kind}/...
        val path = ex.requestURI.path.removePrefix("/androidpublisher/v3/applications/").split('/')
        if (path.getOrNull(0) != PACKAGE) return ex.answer(404, error(404, "No application was found for the given package name."))
        val rest = path.drop(2)
        val notFound = error(404, "The purchase token was not found.")
        when {
            ex.requestMethod == "GET" && rest.size == 3 && rest[0] == "subscriptionsv2" ->
                subscriptions[rest[2]]?.let { ex.answer(200, it) } ?: ex.answer(404, notFound)
            ex.requestMethod == "GET" && rest.size == 4 && rest[0] == "products" ->
                products["${rest[1]}:${rest[3]}"]?.let { ex.answer(200, it) } ?: ex.answer(404, notFound)
            ex.requestMethod == "POST" && rest.size == 4 && rest[0] == "subscriptions" && rest[3].endsWith(":acknowledge") -> {
                val tok = rest[3].removeSuffix(":acknowledge")
                val sub = subscriptions[tok] ?: return ex.answer(404, notFound)
                subscriptions[tok] = sub.replace("ACKNOWLEDGEMENT_STATE_PENDING", "ACKNOWLEDGEMENT_STATE_ACKNOWLEDGED")
                acknowledged += "${rest[1]}:$tok"
                ex.answer(204, "")
            }
            ex.requestMethod == "POST" && rest.size == 4 && rest[0] == "products" -> {
                val (tok, consume) = rest[3].substringBefore(':') to rest[3].endsWith(":consume")
                val key = "${rest[1]}:$tok"
                val product = products[key] ?: return ex.answer(404, notFound)
                if (consume) {
                    products[key] = product.replace("\"consumptionState\":0", "\"consumptionState\":1")
                    consumed += key
                } else {
                    products[key] = product.replace("\"acknowledgementState\":0", "\"acknowledgementState\":1")
                    acknowledged += key
                }
                ex.answer(204, "")
            }
            else -> ex.answer(404, error(404, "no such method"))
        }
    }

    companion object {
        /** The package of the app under test. */
        const val PACKAGE = "com.example.tally"
        private const val SA_EMAIL = "tally-verifier@example-project.iam.gserviceaccount.com"

        private fun fixture(name: String): String = Files.readString(Path.of("../../server/tests/fixtures/google", name))

        private fun claim(json: String, name: String): String? = Regex("\"$name\":\"([^\"]*)\"").find(json)?.groupValues?.get(1)

        private fun error(code: Int, message: String) = """{"error":{"code":$code,"message":"$message"}}"""

        private fun HttpExchange.closing(handle: (HttpExchange) -> Unit) = try {
            handle(this)
        } finally {
            close()
        }

        private fun HttpExchange.answer(status: Int, body: String) {
            val bytes = body.toByteArray()
            responseHeaders.add("Content-Type", "application/json")
            sendResponseHeaders(status, if (status == 204) -1 else bytes.size.toLong())
            if (status != 204) responseBody.use { it.write(bytes) }
        }

        /** A `subscriptionsv2` resource of one line item bound to `account`. */
        fun subscription(product: String, state: String, expiry: Instant, account: String?, order: String): String {
            val ids = account?.let { ""","externalAccountIdentifiers":{"obfuscatedExternalAccountId":"$it"}""" }.orEmpty()
            val renew = state != "SUBSCRIPTION_STATE_CANCELED"
            return """{"kind":"androidpublisher#subscriptionPurchaseV2","regionCode":"US","startTime":"${Instant.now()}",""" +
                """"subscriptionState":"$state","latestOrderId":"$order","acknowledgementState":"ACKNOWLEDGEMENT_STATE_PENDING",""" +
                """"lineItems":[{"productId":"$product","expiryTime":"$expiry","autoRenewingPlan":{"autoRenewEnabled":$renew},""" +
                """"offerDetails":{"basePlanId":"monthly"},"offerPhase":{"basePrice":{}}}]$ids}"""
        }

        /** A `products` resource (`state` 0 purchased, 1 canceled, 2 pending) bound to `account`. */
        fun product(state: Int, account: String?, order: String): String {
            val ids = account?.let { ""","obfuscatedExternalAccountId":"$it"""" }.orEmpty()
            return """{"kind":"androidpublisher#productPurchase","purchaseTimeMillis":"${System.currentTimeMillis()}",""" +
                """"purchaseState":$state,"consumptionState":0,"acknowledgementState":0,"orderId":"$order",""" +
                """"regionCode":"US","quantity":1$ids}"""
        }
    }
}
