// Test harness for the Kotlin bindings: the real server as a child process on a
// loopback port, tokens minted by its `token` subcommand, a recording listener, bounded
// waits, and a tiny test runner that prints `N passed, M failed` last.
//
// No JUnit here (the command-line Kotlin toolchain ships none): `main` in Tests.kt
// runs the tests in order and exits non-zero when one fails.
package com.webwaka.realtime.test

import com.webwaka.realtime.*
import java.io.File
import java.io.IOException
import java.net.HttpURLConnection
import java.net.InetAddress
import java.net.ServerSocket
import java.net.URI
import java.util.Collections
import java.util.UUID
import java.util.concurrent.TimeUnit
import java.util.concurrent.atomic.AtomicInteger

/** A check that failed; the runner prints its message. */
class TestFailure(message: String) : Exception(message)

fun check(condition: Boolean, message: () -> String) {
    if (!condition) throw TestFailure(message())
}

/** Polls `condition` every 20 ms until it holds; fails after `timeoutMs`. */
fun waitUntil(what: String, timeoutMs: Long = 15_000, condition: () -> Boolean) {
    val deadline = System.nanoTime() + TimeUnit.MILLISECONDS.toNanos(timeoutMs)
    while (!condition()) {
        if (System.nanoTime() > deadline) throw TestFailure("timed out after $timeoutMs ms waiting for: $what")
        Thread.sleep(20)
    }
}

/** A free TCP port on the loopback interface (released at once; the server binds it). */
fun freeLoopbackPort(): Int =
    ServerSocket(0, 1, InetAddress.getLoopbackAddress()).use { it.localPort }

/**
 * The real `webwaka-server-stub` binary, run as a child process on 127.0.0.1 with its
 * data in `dataDir`. Stopping it (SIGTERM) and starting it again keeps the port and
 * the data, as a server restart would.
 */
class ServerProcess(private val binary: String, private val dataDir: File) {
    val port = freeLoopbackPort()
    val url = "http://127.0.0.1:$port"
    // One secret for the server and for `token`, so that minted tokens verify.
    private val secret = "kotlin-bindings-test-" + UUID.randomUUID()
    private var process: Process? = null
    private val log = File(dataDir, "server.log")

    init {
        dataDir.mkdirs()
    }

    private fun configure(builder: ProcessBuilder): ProcessBuilder {
        builder.environment().apply {
            put("JWT_SECRET", secret)
            put("DATA_DIR", dataDir.path)
            put("WS_HOST", "127.0.0.1")
            put("WS_PORT", port.toString())
            put("WS_PING_INTERVAL", "1000")
            put("WS_MESSAGE_RATE_LIMIT", "100000")
            put("POLL_RATE_LIMIT", "100000")
            put("RECONCILIATION_RATE_LIMIT", "100000")
            put("PUBLISH_RATE_LIMIT", "100000")
            put("TRANSACTION_CONFIRM_DELAY_MS", "50")
            put("SHUTDOWN_GRACE_MS", "500")
            put("LOG_LEVEL", "warn")
            // Entities of type `contract` keep concurrent edits as open conflicts.
            put("RECONCILIATION_TYPE_STRATEGIES", "contract=MANUAL")
        }
        return builder
    }

    val running: Boolean get() = process?.isAlive == true

    /** Starts the server and waits until `/health` answers (the port may need a moment
     *  to be free again after a stop: a few attempts). */
    fun start() {
        check(!running) { "the server is already running" }
        for (attempt in 1..5) {
            val p = configure(ProcessBuilder(binary))
                .redirectErrorStream(true)
                .redirectOutput(ProcessBuilder.Redirect.appendTo(log))
                .start()
            process = p
            // Tell scripts/test-bindings.sh, which stops whatever a crashed run left.
            System.getProperty("webwaka.pidFile")?.let { File(it).appendText("${p.pid()}\n") }
            val deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(15)
            while (p.isAlive && System.nanoTime() < deadline) {
                if (healthy()) return
                Thread.sleep(50)
            }
            stop()
            Thread.sleep(300)
        }
        throw TestFailure("the server did not start; its log:\n" + log.readText().takeLast(2000))
    }

    private fun healthy(): Boolean = try {
        val c = URI("$url/health").toURL().openConnection() as HttpURLConnection
        c.connectTimeout = 500
        c.readTimeout = 1000
        try { c.responseCode == 200 } finally { c.disconnect() }
    } catch (e: IOException) {
        false
    }

    /** Stops the server gracefully (SIGTERM), forcibly if it takes too long. */
    fun stop() {
        val p = process ?: return
        p.destroy()
        if (!p.waitFor(10, TimeUnit.SECONDS)) {
            p.destroyForcibly()
            p.waitFor(5, TimeUnit.SECONDS)
        }
        process = null
    }

    /** A token for `user` of `tenant`, from the server binary's `token` subcommand. */
    fun token(tenant: String, user: String): String {
        val p = configure(ProcessBuilder(binary, "token", "--tenant", tenant, "--user", user))
            .redirectError(ProcessBuilder.Redirect.INHERIT)
            .start()
        val out = p.inputStream.bufferedReader().readText().trim()
        if (!p.waitFor(30, TimeUnit.SECONDS)) {
            p.destroyForcibly()
            throw TestFailure("`token` did not finish")
        }
        check(p.exitValue() == 0 && out.count { it == '.' } == 2) { "`token` failed: exit ${p.exitValue()}" }
        return out
    }
}

/** A token provider that always gives the same token. */
class StaticTokens(private val token: String) : TokenProvider {
    override suspend fun token(request: TokenRequest): String = token
}

/**
 * A listener that records every update; optionally slow (sleeps per update) or
 * throwing (throws after recording each one).
 */
class Recorder(private val delayMs: Long = 0, private val throwing: Boolean = false) : ClientListener {
    private val updates = Collections.synchronizedList(mutableListOf<ClientUpdate>())
    val calls = AtomicInteger()

    override fun onUpdate(update: ClientUpdate) {
        calls.incrementAndGet()
        if (delayMs > 0) Thread.sleep(delayMs)
        updates.add(update)
        if (throwing) throw IllegalStateException("a listener bug")
    }

    fun snapshot(): List<ClientUpdate> = synchronized(updates) { updates.toList() }

    /** Every connection state seen, in order (the current state first). */
    fun states(): List<ConnectionState> = snapshot().mapNotNull {
        when (it) {
            is ClientUpdate.CurrentState -> it.state
            is ClientUpdate.StateChanged -> it.to
            else -> null
        }
    }

    fun messages(): List<ReceivedMessage> =
        snapshot().filterIsInstance<ClientUpdate.MessageReceived>().map { it.message }

    fun waitFor(what: String, timeoutMs: Long = 15_000, condition: (List<ClientUpdate>) -> Boolean) =
        waitUntil(what, timeoutMs) { condition(snapshot()) }

    fun waitForState(state: ConnectionState, timeoutMs: Long = 15_000) =
        waitUntil("state $state (seen: ${states()})", timeoutMs) { states().lastOrNull() == state }
}

/** One test: a name and a body; a body fails by throwing. */
class TestCase(val name: String, val body: () -> Unit)

/**
 * Runs the tests in order, each at most `perTestMs` (a watchdog ends the run if one
 * hangs), prints one line per test and the closing `N passed, M failed` line.
 * Returns the number of failures.
 */
fun runTests(tests: List<TestCase>, only: String?): Int {
    var passed = 0
    var failed = 0
    for (t in tests) {
        if (only != null && !t.name.contains(only)) continue
        val started = System.nanoTime()
        try {
            t.body()
            passed++
            println("PASS  ${t.name} (${(System.nanoTime() - started) / 1_000_000} ms)")
        } catch (e: Throwable) {
            failed++
            println("FAIL  ${t.name} (${(System.nanoTime() - started) / 1_000_000} ms): $e")
            if (e !is TestFailure) e.printStackTrace(System.out)
        }
    }
    println("$passed passed, $failed failed")
    return failed
}

/** Reads VmRSS of this process, in KiB. */
fun rssKib(): Long = File("/proc/self/status").readLines()
    .first { it.startsWith("VmRSS:") }
    .removePrefix("VmRSS:").trim().removeSuffix("kB").trim().toLong()

/** Open file descriptors of this process. */
fun openFds(): Int = File("/proc/self/fd").list()?.size ?: -1
