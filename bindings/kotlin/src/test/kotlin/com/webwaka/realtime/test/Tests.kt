// Tests of the Kotlin bindings, run on the JVM against the built
// libwebwaka_realtime_ffi.so and a real webwaka-server-stub process (see Harness.kt).
//
//   java -Dwebwaka.server=PATH/webwaka-server-stub -Djna.library.path=DIR \
//        -cp kotlin-tests.jar:$CLASSPATH com.webwaka.realtime.test.TestsKt [name-filter]
//
// scripts/test-bindings.sh compiles and runs this. The last line printed is
// `N passed, M failed`; the exit status is non-zero when a test failed.
package com.webwaka.realtime.test

import com.webwaka.realtime.*
import java.io.File
import java.nio.file.Files
import kotlin.system.exitProcess
import kotlinx.coroutines.runBlocking

/** The whole run is bounded: a hung test ends it (status 3) after this. */
const val RUN_LIMIT_MS = 300_000L

lateinit var server: ServerProcess
lateinit var workDir: File

/** Client options with quick retries and probes, a store file of its own. */
fun options(store: String, serverUrl: String = server.url) = ClientOptions(
    serverUrl = serverUrl,
    storePath = File(workDir, "$store.db").path,
    backoffMinMs = 50uL,
    backoffMaxMs = 500uL,
    slowConnectMs = 500uL,
    pollIntervalMs = 100uL,
    probeMinMs = 200uL,
    probeMaxMs = 1_000uL,
    pingIntervalMs = 1_000uL,
    pongTimeoutMs = 3_000uL,
    ackTimeoutMs = 2_000uL,
    requestTimeoutMs = 5_000uL,
    entityPullIntervalMs = 300uL,
    transactionCheckIntervalMs = 200uL,
)

/** Opens a client for `user` of `tenant` with a token minted by the server binary. */
fun open(tenant: String, user: String, store: String = "$tenant-$user"): RealtimeClient =
    runBlocking { RealtimeClient.open(options(store), StaticTokens(server.token(tenant, user))) }

fun chat(room: String, text: String) = OutgoingMessage(
    target = MessageTarget.Room(room),
    messageType = "chat.text",
    payloadJson = """{"text":"$text"}""",
)

/** Joins `room` and waits for the server's answer. */
fun RealtimeClient.joinAndWait(room: String, recorder: Recorder) {
    runBlocking { joinRoom(room) }
    recorder.waitFor("joined $room") { u ->
        u.any { it is ClientUpdate.RoomChanged && it.roomId == room && it.joined }
    }
}

// ---------------------------------------------------------------------------------------

fun connectsAndReportsTheCurrentStateFirst() {
    val recorder = Recorder()
    open("k1", "alice").use { client ->
        client.subscribe(recorder).use {
            recorder.waitForState(ConnectionState.REALTIME)
            val first = recorder.snapshot().first()
            check(first is ClientUpdate.CurrentState) { "first update was $first" }
            check(client.connectionState() == ConnectionState.REALTIME) { "state ${client.connectionState()}" }
            check(client.clientId().isNotBlank()) { "no client id" }
            val reasons = recorder.snapshot().filterIsInstance<ClientUpdate.StateChanged>()
                .filter { it.to == ConnectionState.REALTIME }.map { it.reason }
            check(StateReason.WEB_SOCKET_OPENED in reasons) { "reasons $reasons" }
        }
        runBlocking { client.shutdown() }
    }
}

fun twoClientsExchangeMessages() {
    val (a, b) = Recorder() to Recorder()
    open("k2", "alice").use { alice ->
        open("k2", "bob").use { bob ->
            alice.subscribe(a).use {
                bob.subscribe(b).use {
                    a.waitForState(ConnectionState.REALTIME)
                    b.waitForState(ConnectionState.REALTIME)
                    alice.joinAndWait("room-2", a)
                    bob.joinAndWait("room-2", b)
                    val sent = runBlocking { alice.sendMessage(chat("room-2", "hello bob")) }
                    check(sent.kind == OutboxItemKind.MESSAGE && sent.`class` == InteractionClass.CLASS_C) { "$sent" }
                    runBlocking { bob.sendMessage(chat("room-2", "hello alice")) }
                    b.waitFor("bob receives alice's message") { _ ->
                        b.messages().any { it.senderId == "alice" && it.payloadJson.contains("hello bob") }
                    }
                    a.waitFor("alice receives bob's message") { _ ->
                        a.messages().any { it.senderId == "bob" && it.payloadJson.contains("hello alice") }
                    }
                    val got = b.messages().first { it.senderId == "alice" }
                    check(got.roomId == "room-2" && got.messageId == sent.id && got.sequence != null) { "$got" }
                    val settled = runBlocking {
                        alice.waitSettled(sent.id, listOf(OutboxItemState.ACCEPTED), 10_000uL)
                    }
                    check(settled.state == OutboxItemState.ACCEPTED && settled.serverRef != null) { "$settled" }
                    check(a.snapshot().any { it is ClientUpdate.OutboxChanged && it.change.id == sent.id && it.change.state == OutboxItemState.ACCEPTED }) {
                        "no OutboxChanged ACCEPTED for ${sent.id}"
                    }
                    // Live-only traffic: a typing indicator and a presence change.
                    runBlocking {
                        alice.sendLive(MessageTarget.Room("room-2"), "typing", """{"on":true}""")
                        bob.setPresence(PresenceStatus.AWAY, """{"note":"lunch"}""")
                    }
                    b.waitFor("bob receives alice's typing (Class A)") { _ ->
                        b.messages().any { it.messageType == "typing" && it.interactionClass == InteractionClass.CLASS_A }
                    }
                    a.waitFor("alice sees bob away") { u ->
                        u.any { it is ClientUpdate.PresenceChanged && it.presence.userId == "bob" && it.presence.status == PresenceStatus.AWAY }
                    }
                }
            }
        }
    }
}

fun messagesQueueWhileTheServerIsDownAndDeliverAfterItRestarts() {
    val (a, b) = Recorder() to Recorder()
    open("k3", "alice").use { alice ->
        open("k3", "bob").use { bob ->
            alice.subscribe(a).use {
                bob.subscribe(b).use {
                    a.waitForState(ConnectionState.REALTIME)
                    b.waitForState(ConnectionState.REALTIME)
                    alice.joinAndWait("room-3", a)
                    bob.joinAndWait("room-3", b)
                    server.stop()
                    waitUntil("alice notices the server is gone (states ${a.states()})") {
                        alice.connectionState() != ConnectionState.REALTIME
                    }
                    val items = (1..3).map { n -> runBlocking { alice.sendMessage(chat("room-3", "queued $n")) } }
                    val queued = runBlocking { alice.outbox(null) }.filter { i -> items.any { it.id == i.id } }
                    check(queued.size == 3 && queued.none { it.state == OutboxItemState.ACCEPTED }) { "$queued" }
                    check(runBlocking { alice.metrics() }.outboxItems >= 3uL) { "metrics count no queued items" }
                    server.start()
                    b.waitFor("bob receives the 3 queued messages", 20_000) { _ ->
                        b.messages().count { it.payloadJson.contains("queued") } == 3
                    }
                    val order = b.messages().filter { it.payloadJson.contains("queued") }.map { it.payloadJson }
                    check(order == (1..3).map { """{"text":"queued $it"}""" }) { "order $order" }
                    for (item in items) {
                        val s = runBlocking { alice.waitSettled(item.id, listOf(OutboxItemState.ACCEPTED), 10_000uL) }
                        check(s.state == OutboxItemState.ACCEPTED) { "$s" }
                    }
                    // The listener saw the whole story: realtime, lost, realtime again (the
                    // queued messages may have gone out by polling before the WebSocket's
                    // probe succeeded: wait for it).
                    a.waitForState(ConnectionState.REALTIME)
                    val states = a.states()
                    val firstRealtime = states.indexOf(ConnectionState.REALTIME)
                    val lost = states.withIndex().indexOfFirst { (i, s) -> i > firstRealtime && s != ConnectionState.REALTIME }
                    check(firstRealtime >= 0 && lost > firstRealtime &&
                        states.subList(lost, states.size).contains(ConnectionState.REALTIME)) { "states $states" }
                }
            }
        }
    }
}

fun anEntityEditedOfflineReconciles() {
    val (a, b) = Recorder() to Recorder()
    open("k4", "alice").use { alice ->
        open("k4", "bob").use { bob ->
            alice.subscribe(a).use {
                bob.subscribe(b).use {
                    a.waitForState(ConnectionState.REALTIME)
                    b.waitForState(ConnectionState.REALTIME)
                    server.stop()
                    waitUntil("alice offline") { alice.connectionState() != ConnectionState.REALTIME }
                    runBlocking {
                        alice.createEntity("note", "n1", """{"title":"draft","body":"offline"}""")
                        val edited = alice.updateEntity("note", "n1", """{"title":"final"}""")
                        check(edited.pendingEdits >= 1u && edited.serverVersion == 0uL) { "$edited" }
                        check(edited.valueJson.contains("final") && edited.valueJson.contains("offline")) { edited.valueJson }
                    }
                    check(a.snapshot().any { it is ClientUpdate.EntityChanged && it.entity.entityId == "n1" }) { "no EntityChanged" }
                    server.start()
                    waitUntil("alice's edits reconciled") {
                        val e = runBlocking { alice.entity("note", "n1") }
                        e != null && e.pendingEdits == 0u && e.serverVersion > 0uL
                    }
                    bob.syncEntities()
                    waitUntil("bob sees alice's entity") {
                        val e = runBlocking { bob.entity("note", "n1") }
                        e != null && e.valueJson.contains("final") && e.valueJson.contains("offline")
                    }
                    check(runBlocking { bob.entityIds("note") }.contains("n1")) { "bob's ids" }
                }
            }
        }
    }
}

fun aClassDTransactionIsConfirmed() {
    val a = Recorder()
    open("k5", "alice").use { alice ->
        alice.subscribe(a).use {
            a.waitForState(ConnectionState.REALTIME)
            val item = runBlocking {
                alice.submitTransaction("payment", """{"amount":1500,"currency":"NGN"}""", """{"orderId":"o-1"}""")
            }
            check(item.kind == OutboxItemKind.TRANSACTION && item.`class` == InteractionClass.CLASS_D) { "$item" }
            val settled = runBlocking {
                alice.waitSettled(item.id, listOf(OutboxItemState.CONFIRMED, OutboxItemState.REJECTED), 15_000uL)
            }
            check(settled.state == OutboxItemState.CONFIRMED) { "$settled" }
            a.waitFor("TransactionChanged CONFIRMED") { u ->
                u.any { it is ClientUpdate.TransactionChanged && it.change.id == item.id && it.change.status == TransactionStatus.CONFIRMED }
            }
        }
    }
}

/** The names of the store's files (the database, its WAL and shared memory) holding `marker`. */
fun storeFilesHolding(store: String, marker: String): List<String> {
    val needle = marker.toByteArray()
    fun holds(bytes: ByteArray): Boolean {
        outer@ for (i in 0..bytes.size - needle.size) {
            for (j in needle.indices) if (bytes[i + j] != needle[j]) continue@outer
            return true
        }
        return false
    }
    return listOf("", "-wal", "-shm").map { File(workDir, "$store.db$it") }
        .filter { it.exists() && holds(it.readBytes()) }
        .map { it.name }
}

/** With `encryptionKey`, no plaintext in the store's files; a wrong key or none is WrongKey; rekey. */
fun anEncryptedStoreHoldsNoPlaintextAndNeedsItsKey() {
    val key = ByteArray(32).also { java.security.SecureRandom().nextBytes(it) }
    val marker = "KOTLIN-SECRET-5e1f09"
    val tokens = StaticTokens(server.token("k12", "alice"))
    runBlocking {
        // The plaintext store first: the check finds the marker there, so it can fail.
        for ((store, k) in listOf("k12-plain" to null, "k12-enc" to key)) {
            val c = RealtimeClient.open(options(store).copy(encryptionKey = k), tokens)
            c.use {
                val m = c.sendMessage(OutgoingMessage(MessageTarget.User("bob"), "dm", """{"text":"$marker"}"""))
                val t = c.submitTransaction("payment", """{"note":"$marker"}""", null)
                check(c.waitSettled(m.id, listOf(OutboxItemState.ACCEPTED), 15_000uL).state == OutboxItemState.ACCEPTED) { "message not accepted" }
                check(c.waitSettled(t.id, listOf(OutboxItemState.CONFIRMED), 15_000uL).state == OutboxItemState.CONFIRMED) { "transaction not confirmed" }
                val holding = storeFilesHolding(store, marker)
                if (k == null) {
                    check(holding.isNotEmpty()) { "the plaintext store shows the marker" }
                } else {
                    check(File(workDir, "$store.db-wal").length() > 0) { "the WAL holds pages while open" }
                    check(holding.isEmpty()) { "plaintext in $holding while open" }
                }
                c.shutdown()
            }
            if (k != null) check(storeFilesHolding(store, marker).isEmpty()) { "plaintext after shutdown" }
        }
        for (wrong in listOf(ByteArray(32) { 7 }, null)) {
            try {
                RealtimeClient.open(options("k12-enc").copy(encryptionKey = wrong), tokens)
                throw TestFailure("an encrypted store opened with ${if (wrong == null) "no key" else "a wrong key"}")
            } catch (e: RealtimeException.WrongKey) {
            }
        }
        try {
            RealtimeClient.open(options("k12-short").copy(encryptionKey = ByteArray(16)), tokens)
            throw TestFailure("a 16-byte key was accepted")
        } catch (e: RealtimeException.InvalidInput) {
            check(e.field == "encryptionKey") { "field ${e.field}" }
        }
        // Rotation: the new key opens it with everything in it, the old one no longer does.
        val newKey = ByteArray(32).also { java.security.SecureRandom().nextBytes(it) }
        RealtimeClient.open(options("k12-enc").copy(encryptionKey = key), tokens).use { c ->
            c.rekey(newKey)
            c.shutdown()
        }
        try {
            RealtimeClient.open(options("k12-enc").copy(encryptionKey = key), tokens)
            throw TestFailure("the old key still opens the store")
        } catch (e: RealtimeException.WrongKey) {
        }
        RealtimeClient.open(options("k12-enc").copy(encryptionKey = newKey), tokens).use { c ->
            val items = c.outbox(null)
            check(items.size == 2) { "the items survived the rotation: $items" }
            c.shutdown()
        }
    }
}

fun inTheBackgroundTheClientParksAndConnectsForTheAppsSends() {
    val recorder = Recorder()
    val parked = { u: ClientUpdate ->
        u is ClientUpdate.StateChanged && u.to == ConnectionState.OFFLINE && u.reason == StateReason.BACKGROUND
    }
    val client = runBlocking {
        RealtimeClient.open(options("k13-alice").copy(backgroundLingerMs = 0uL), StaticTokens(server.token("k13", "alice")))
    }
    client.use {
        client.subscribe(recorder).use {
            recorder.waitForState(ConnectionState.REALTIME)
            client.background()
            recorder.waitFor("parked: Offline, reason BACKGROUND") { u -> u.any(parked) }
            // A send from the background connects for it, is delivered, and parks again.
            val sent = runBlocking {
                client.sendMessage(OutgoingMessage(MessageTarget.User("bob"), "dm", "{\"text\":\"from the background\"}"))
            }
            val settled = runBlocking { client.waitSettled(sent.id, listOf(OutboxItemState.ACCEPTED), 10_000uL) }
            check(settled.state == OutboxItemState.ACCEPTED) { "$settled" }
            recorder.waitFor("connected for the app's send, then parked again") { u ->
                val request = u.indexOfFirst { it is ClientUpdate.StateChanged && it.reason == StateReason.APP_REQUEST }
                request >= 0 && u.drop(request).any(parked)
            }
            client.foreground()
            recorder.waitForState(ConnectionState.REALTIME)
        }
        runBlocking { client.shutdown() }
    }
}

fun errorsArriveAsKotlinExceptions() {
    open("k6", "alice").use { client ->
        runBlocking {
            try {
                client.sendMessage(chat("room-6", "x").copy(payloadJson = "{not json"))
                throw TestFailure("bad JSON was accepted")
            } catch (e: RealtimeException.InvalidInput) {
                check(e.field == "payloadJson") { "field ${e.field}" }
                check(!e.message.orEmpty().contains("not json")) { "the payload leaked into the message: ${e.message}" }
            }
            try {
                client.joinRoom(" ")
                throw TestFailure("a blank room was accepted")
            } catch (e: RealtimeException.InvalidInput) {
                check(e.field == "roomId") { "field ${e.field}" }
            }
            try {
                client.retry("no-such-item")
                throw TestFailure("retry of a missing item succeeded")
            } catch (e: RealtimeException.NotFound) {
            }
            try {
                RealtimeClient.open(options("bad").copy(serverUrl = ""), StaticTokens("x.y.z"))
                throw TestFailure("an empty server URL was accepted")
            } catch (e: RealtimeException.InvalidInput) {
                check(e.field == "serverUrl") { "field ${e.field}" }
            }
            client.shutdown()
            try {
                client.metrics()
                throw TestFailure("metrics after shutdown succeeded")
            } catch (e: RealtimeException.Closed) {
            }
        }
    }
    // Live-only (Class A) with no connection: dropped, and said so.
    runBlocking {
        RealtimeClient.open(options("offline", "http://127.0.0.1:1"), StaticTokens(server.token("k6", "bob"))).use { c ->
            try {
                c.sendLive(MessageTarget.Room("room-6"), "typing", "{}")
                throw TestFailure("a live message was accepted offline")
            } catch (e: RealtimeException.NotConnected) {
            }
        }
    }
}

/** The token provider throws: AUTH_FAILED; once it gives a token, reauthenticate() recovers. */
fun aFailingTokenProviderMeansAuthFailedUntilReauthenticate() {
    val good = server.token("k7", "alice")
    val tokens = object : TokenProvider {
        @Volatile var signedIn = false
        override suspend fun token(request: TokenRequest): String {
            if (!signedIn) throw CallbackException.Failed("signed out")
            return good
        }
    }
    val a = Recorder()
    runBlocking { RealtimeClient.open(options("k7-alice"), tokens) }.use { client ->
        client.subscribe(a).use {
            a.waitForState(ConnectionState.AUTH_FAILED)
            tokens.signedIn = true
            client.reauthenticate()
            a.waitForState(ConnectionState.REALTIME)
        }
    }
}

fun slowAndThrowingListenersDoNotStallTheClient() {
    val normal = Recorder()
    val slow = Recorder(delayMs = 500)
    val throwing = Recorder(throwing = true)
    val a = Recorder()
    open("k8", "alice").use { alice ->
        open("k8", "bob").use { bob ->
            bob.subscribe(normal).use { bob.subscribe(slow).use { bob.subscribe(throwing).use { alice.subscribe(a).use {
                normal.waitForState(ConnectionState.REALTIME)
                a.waitForState(ConnectionState.REALTIME)
                alice.joinAndWait("room-8", a)
                bob.joinAndWait("room-8", normal)
                val started = System.nanoTime()
                runBlocking { for (n in 1..20) alice.sendMessage(chat("room-8", "m$n")) }
                normal.waitFor("all 20 messages, in order") { _ ->
                    normal.messages().map { it.payloadJson } == (1..20).map { """{"text":"m$it"}""" }
                }
                throwing.waitFor("the throwing listener still receives") { _ -> throwing.messages().size == 20 }
                val ms = (System.nanoTime() - started) / 1_000_000
                // The slow listener needs 500 ms an update (10 s for the 20 messages
                // alone): the others did not wait for it.
                check(slow.messages().size < 20) { "the slow listener kept up?" }
                check(ms < 9_000) { "deliveries took $ms ms" }
            } } } }
        }
    }
}

fun theLoggerReceivesRecordsWithoutTokens() {
    val records = java.util.Collections.synchronizedList(mutableListOf<LogRecord>())
    setLogger(object : Logger {
        override fun log(record: LogRecord) { records.add(record) }
    }, LogLevel.INFO, false)
    try {
        val token = server.token("k9", "alice")
        val a = Recorder()
        runBlocking { RealtimeClient.open(options("k9-alice"), StaticTokens(token)) }.use { client ->
            client.subscribe(a).use { a.waitForState(ConnectionState.REALTIME) }
        }
        waitUntil("a connection-state record") {
            synchronized(records) { records.any { it.message.contains("connection state") && it.level == LogLevel.INFO } }
        }
        val signature = token.substringAfterLast('.')
        synchronized(records) {
            check(records.none { it.message.contains(signature) }) { "a token in the log" }
            check(records.all { it.target.startsWith("webwaka") }) { "dependency records without asking" }
        }
    } finally {
        setLogger(null, LogLevel.OFF, false)
    }
}

/** Concurrent offline edits of a MANUAL entity: one open conflict with both sides, resolved by the app. */
fun aManualConflictShowsBothSidesAndIsResolved() {
    val (a, b) = Recorder() to Recorder()
    open("k12", "alice").use { alice ->
        open("k12", "bob").use { bob ->
            alice.subscribe(a).use { bob.subscribe(b).use {
                a.waitForState(ConnectionState.REALTIME)
                b.waitForState(ConnectionState.REALTIME)
                runBlocking { alice.createEntity("contract", "c1", """{"price":100}""") }
                waitUntil("bob sees the contract") {
                    bob.syncEntities()
                    runBlocking { bob.entity("contract", "c1") }?.valueJson == """{"price":100}"""
                }
                server.stop()
                waitUntil("both offline") {
                    alice.connectionState() != ConnectionState.REALTIME && bob.connectionState() != ConnectionState.REALTIME
                }
                runBlocking { alice.updateEntity("contract", "c1", """{"price":110}""") }
                Thread.sleep(20)
                runBlocking { bob.updateEntity("contract", "c1", """{"price":120}""") }
                server.start()
                waitUntil("both replicas settled") {
                    val (ea, eb) = runBlocking { alice.entity("contract", "c1") to bob.entity("contract", "c1") }
                    ea != null && eb != null && ea.pendingEdits == 0u && eb.pendingEdits == 0u && ea.valueJson == eb.valueJson
                }
                val (ca, cb) = runBlocking { alice.conflicts() to bob.conflicts() }
                check(ca.size + cb.size == 1) { "open conflicts: $ca $cb" }
                val (holder, conflict) = if (ca.isNotEmpty()) alice to ca[0] else bob to cb[0]
                val sides = conflict.operations.map { it.payloadJson }.toSet()
                check(sides == setOf("""{"price":110}""", """{"price":120}""")) { "sides $sides" }
                check(conflict.operations.count { it.isLocal } == 1 && conflict.outcome == null) { "$conflict" }
                runBlocking { holder.resolveConflict(conflict.conflictId, ConflictChoice.Value("""{"price":115}""")) }
                waitUntil("the resolution reaches both") {
                    bob.syncEntities(); alice.syncEntities()
                    val (ea, eb) = runBlocking { alice.entity("contract", "c1") to bob.entity("contract", "c1") }
                    ea?.valueJson == """{"price":115}""" && eb?.valueJson == ea?.valueJson
                }
                check(runBlocking { holder.conflicts() }.isEmpty()) { "the conflict is still open" }
            } }
        }
    }
}

/**
 * Thousands of clients and subscriptions created and freed from Kotlin: the SDK's
 * live-object counts return to zero, file descriptors to where they were, and RSS
 * stays within a bound. Most clients point at a closed port (lifetimes, not network);
 * a few dozen connect to the real server.
 */
fun clientsAndSubscriptionsAreFreed() {
    val token = server.token("k10", "mem")
    val tokens = StaticTokens(token)
    fun round(i: Int, serverUrl: String, waitRealtime: Boolean) {
        val store = "mem-${i % 16}"
        val o = options(store, serverUrl).copy(durability = Durability.NORMAL)
        runBlocking { RealtimeClient.open(o, tokens) }.use { c ->
            val r = Recorder()
            val h1 = c.subscribe(r)
            val h2 = c.subscribe(Recorder())
            if (waitRealtime) r.waitForState(ConnectionState.REALTIME)
            h1.cancel()
            h1.close()
            h2.close()
            if (i % 2 == 0) runBlocking { c.shutdown() }
        }
    }
    fun waitFreed() = waitUntil("every SDK object freed (${liveObjects()})", 20_000) {
        liveObjects() == LiveObjects(0uL, 0uL, 0uL, 0uL)
    }
    repeat(100) { round(it, "http://127.0.0.1:1", false) }
    waitFreed()
    System.gc(); Thread.sleep(500)
    val (rss0, fds0) = rssKib() to openFds()
    val started = System.nanoTime()
    repeat(1_000) { round(it, "http://127.0.0.1:1", false) }
    repeat(40) { round(it, server.url, true) }
    waitFreed()
    System.gc(); Thread.sleep(1_000)
    val (rss1, fds1) = rssKib() to openFds()
    println("      memory: 1040 clients, 2080 subscriptions in ${(System.nanoTime() - started) / 1_000_000} ms; " +
        "RSS $rss0 -> $rss1 KiB, fds $fds0 -> $fds1")
    check(fds1 <= fds0 + 4) { "file descriptors leaked: $fds0 -> $fds1" }
    check(rss1 - rss0 < 64 * 1024) { "RSS grew by ${rss1 - rss0} KiB" }
}

/** The cost of one FFI round trip: a trivial async call, a sync call, a store read. */
fun ffiCallCost() {
    runBlocking {
        repeat(2_000) { ping(it.toULong()) }
        val n = 20_000
        var t = System.nanoTime()
        for (i in 0 until n) check(ping(i.toULong()) == i.toULong()) { "ping" }
        val asyncPerSec = n * 1e9 / (System.nanoTime() - t)
        open("k11", "alice").use { c ->
            repeat(2_000) { c.connectionState(); c.rooms() }
            t = System.nanoTime()
            for (i in 0 until n) c.connectionState()
            val syncPerSec = n * 1e9 / (System.nanoTime() - t)
            val m = 2_000
            t = System.nanoTime()
            for (i in 0 until m) c.rooms()
            val storePerSec = m * 1e9 / (System.nanoTime() - t)
            println("      FFI cost: async ping ${asyncPerSec.toInt()}/s (${(1e6 / asyncPerSec).toInt()} us), " +
                "sync connectionState ${syncPerSec.toInt()}/s, async rooms() (runtime hop + SQLite) ${storePerSec.toInt()}/s")
            check(asyncPerSec > 500) { "async calls are far too slow: $asyncPerSec/s" }
        }
    }
}

val tests = listOf(
    TestCase("connects and reports the current state first", ::connectsAndReportsTheCurrentStateFirst),
    TestCase("two clients exchange messages", ::twoClientsExchangeMessages),
    TestCase("messages queue while the server is down and deliver after it restarts", ::messagesQueueWhileTheServerIsDownAndDeliverAfterItRestarts),
    TestCase("an entity edited offline reconciles", ::anEntityEditedOfflineReconciles),
    TestCase("a Class D transaction is confirmed", ::aClassDTransactionIsConfirmed),
    TestCase("an encrypted store holds no plaintext and needs its key", ::anEncryptedStoreHoldsNoPlaintextAndNeedsItsKey),
    TestCase("a MANUAL conflict shows both sides and is resolved", ::aManualConflictShowsBothSidesAndIsResolved),
    TestCase("in the background the client parks and connects for the app's sends", ::inTheBackgroundTheClientParksAndConnectsForTheAppsSends),
    TestCase("errors arrive as Kotlin exceptions", ::errorsArriveAsKotlinExceptions),
    TestCase("a failing token provider means AUTH_FAILED until reauthenticate", ::aFailingTokenProviderMeansAuthFailedUntilReauthenticate),
    TestCase("slow and throwing listeners do not stall the client", ::slowAndThrowingListenersDoNotStallTheClient),
    TestCase("the logger receives records without tokens", ::theLoggerReceivesRecordsWithoutTokens),
    TestCase("thousands of clients and subscriptions are freed", ::clientsAndSubscriptionsAreFreed),
    TestCase("FFI call cost", ::ffiCallCost),
)

fun main(args: Array<String>) {
    val binary = System.getProperty("webwaka.server")
        ?: run { System.err.println("set -Dwebwaka.server=PATH to the webwaka-server-stub binary"); exitProcess(2) }
    workDir = Files.createTempDirectory("webwaka-kotlin-tests").toFile()
    server = ServerProcess(binary, File(workDir, "server"))
    // Whatever happens, the server process does not outlive the run.
    Runtime.getRuntime().addShutdownHook(Thread { server.stop() })
    Thread {
        Thread.sleep(RUN_LIMIT_MS)
        println("the run took longer than $RUN_LIMIT_MS ms: stopping")
        println("0 passed, 1 failed")
        exitProcess(3)
    }.apply { isDaemon = true }.start()

    val failed = try {
        server.start()
        runTests(tests, args.firstOrNull())
    } catch (e: Throwable) {
        println("the harness failed: $e")
        println("0 passed, 1 failed")
        1
    } finally {
        server.stop()
    }
    if (failed == 0) workDir.deleteRecursively()
    else System.err.println("test files kept in $workDir")
    exitProcess(if (failed == 0) 0 else 1)
}
