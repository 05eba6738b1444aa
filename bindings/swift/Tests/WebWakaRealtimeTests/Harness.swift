// Test harness for the Swift bindings: the real server as a child process on a loopback
// port, tokens minted by its `token` subcommand, a recording listener and bounded waits.
//
// The server binary comes from WEBWAKA_SERVER (scripts/test-bindings.sh sets it); each
// server PID is appended to WEBWAKA_PID_FILE when set, so that the script can stop a
// server that a crashed test run left behind.
import Foundation
import WebWakaRealtime
import XCTest

#if canImport(Glibc)
import Glibc
#endif

struct TestFailure: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

func check(_ condition: Bool, _ message: @autoclosure () -> String) throws {
    if !condition { throw TestFailure(message()) }
}

/// Polls `condition` every 20 ms until it holds; throws after `timeout` seconds.
func waitUntil(_ what: @autoclosure () -> String, timeout: Double = 15,
               _ condition: () async throws -> Bool) async throws {
    let deadline = Date().addingTimeInterval(timeout)
    while try await !condition() {
        if Date() > deadline { throw TestFailure("timed out after \(timeout) s waiting for: \(what())") }
        try await Task.sleep(nanoseconds: 20_000_000)
    }
}

/// A free TCP port on 127.0.0.1 (released at once; the server binds it).
func freeLoopbackPort() -> Int {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    defer { close(fd) }
    var addr = sockaddr_in()
    addr.sin_family = sa_family_t(AF_INET)
    addr.sin_port = 0
    addr.sin_addr.s_addr = inet_addr("127.0.0.1")
    var len = socklen_t(MemoryLayout<sockaddr_in>.size)
    _ = withUnsafeMutablePointer(to: &addr) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { p -> Int32 in
            guard bind(fd, p, len) == 0 else { return -1 }
            return getsockname(fd, p, &len)
        }
    }
    return Int(UInt16(bigEndian: addr.sin_port))
}

/// Starts `path` with `args` and `env`, its output appended to `logPath`, with an
/// empty signal mask and default SIGTERM/SIGINT handling. (Foundation's `Process`
/// passes on the spawning thread's blocked signals: from a Swift concurrency thread
/// the server would never see its SIGTERM.)
func spawnProcess(_ path: String, _ args: [String], env: [String: String], logPath: String) throws -> pid_t {
    var attr = posix_spawnattr_t()
    posix_spawnattr_init(&attr)
    defer { posix_spawnattr_destroy(&attr) }
    var none = sigset_t()
    sigemptyset(&none)
    posix_spawnattr_setsigmask(&attr, &none)
    var defaults = sigset_t()
    sigemptyset(&defaults)
    sigaddset(&defaults, SIGTERM)
    sigaddset(&defaults, SIGINT)
    posix_spawnattr_setsigdefault(&attr, &defaults)
    posix_spawnattr_setflags(&attr, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))

    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    posix_spawn_file_actions_addopen(&actions, 1, logPath, O_WRONLY | O_CREAT | O_APPEND, 0o644)
    posix_spawn_file_actions_adddup2(&actions, 1, 2)
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)

    let argv: [UnsafeMutablePointer<CChar>?] = ([path] + args).map { strdup($0) } + [nil]
    let envp: [UnsafeMutablePointer<CChar>?] = env.map { strdup("\($0.key)=\($0.value)") } + [nil]
    defer { (argv + envp).forEach { free($0) } }
    var pid = pid_t()
    let rc = posix_spawn(&pid, path, &actions, &attr, argv, envp)
    guard rc == 0 else { throw TestFailure("cannot start \(path): error \(rc)") }
    return pid
}

/// True while `pid` (a child of ours) has not exited; reaps it once it has.
func childRunning(_ pid: pid_t) -> Bool {
    var status: Int32 = 0
    let r = waitpid(pid, &status, WNOHANG)
    return r == 0  // 0: still running; pid: exited now; -1: already reaped
}

/// The real `webwaka-server-stub` binary as a child process on 127.0.0.1, its data in
/// `dataDir`. Stopping (SIGTERM) and starting it again keeps the port and the data.
final class ServerProcess: @unchecked Sendable {
    let binary: String
    let dataDir: URL
    let port = freeLoopbackPort()
    var url: String { "http://127.0.0.1:\(port)" }
    private let secret = "swift-bindings-test-" + UUID().uuidString
    private var pid: pid_t?
    private var starts = 0

    init(binary: String, dataDir: URL) {
        self.binary = binary
        self.dataDir = dataDir
        try? FileManager.default.createDirectory(at: dataDir, withIntermediateDirectories: true)
    }

    private var environment: [String: String] {
        [
            "JWT_SECRET": secret,
            "DATA_DIR": dataDir.path,
            "WS_HOST": "127.0.0.1",
            "WS_PORT": String(port),
            "WS_PING_INTERVAL": "1000",
            "WS_MESSAGE_RATE_LIMIT": "100000",
            "POLL_RATE_LIMIT": "100000",
            "RECONCILIATION_RATE_LIMIT": "100000",
            "PUBLISH_RATE_LIMIT": "100000",
            "TRANSACTION_CONFIRM_DELAY_MS": "50",
            "SHUTDOWN_GRACE_MS": "500",
            "LOG_LEVEL": "warn",
            // Entities of type `contract` keep concurrent edits as open conflicts.
            "RECONCILIATION_TYPE_STRATEGIES": "contract=MANUAL",
        ]
    }

    var running: Bool { pid.map(childRunning) ?? false }

    /// Starts the server and waits for its "listening" banner (a few attempts: the
    /// port may need a moment to be free again after a stop).
    func start() throws {
        for _ in 1...5 {
            starts += 1
            let log = dataDir.appendingPathComponent("server-\(starts).log").path
            let child = try spawnProcess(binary, [], env: environment, logPath: log)
            pid = child
            if let pidFile = ProcessInfo.processInfo.environment["WEBWAKA_PID_FILE"],
               let h = FileHandle(forWritingAtPath: pidFile) {
                h.seekToEndOfFile()
                h.write("\(child)\n".data(using: .utf8)!)
                h.closeFile()
            }
            let deadline = Date().addingTimeInterval(15)
            while childRunning(child) && Date() < deadline {
                if let text = try? String(contentsOfFile: log, encoding: .utf8), text.contains("listening") {
                    return
                }
                Thread.sleep(forTimeInterval: 0.05)
            }
            stop()
            Thread.sleep(forTimeInterval: 0.3)
        }
        throw TestFailure("the server did not start (logs in \(dataDir.path))")
    }

    /// Stops the server gracefully (SIGTERM), forcibly if it takes more than 10 s.
    func stop() {
        guard let child = pid else { return }
        pid = nil
        guard childRunning(child) else { return }
        kill(child, SIGTERM)
        let deadline = Date().addingTimeInterval(10)
        while childRunning(child) {
            if Date() > deadline {
                kill(child, SIGKILL)
                var status: Int32 = 0
                waitpid(child, &status, 0)
                return
            }
            Thread.sleep(forTimeInterval: 0.02)
        }
    }

    /// A token for `user` of `tenant`, from the binary's `token` subcommand.
    func token(tenant: String, user: String) throws -> String {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: binary)
        p.arguments = ["token", "--tenant", tenant, "--user", user]
        p.environment = environment
        let pipe = Pipe()
        p.standardOutput = pipe
        try p.run()
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        let token = String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        try check(p.terminationStatus == 0 && token.split(separator: ".").count == 3,
                  "`token` failed with status \(p.terminationStatus)")
        return token
    }
}

/// A token provider that always gives the same token.
final class StaticTokens: TokenProvider, @unchecked Sendable {
    let value: String
    init(_ value: String) { self.value = value }
    func token(request: TokenRequest) async throws -> String { value }
}

struct ListenerBug: Error {}

/// A listener that records every update; optionally slow or throwing.
final class Recorder: ClientListener, @unchecked Sendable {
    private let lock = NSLock()
    private var updates: [ClientUpdate] = []
    private var callCount = 0
    let delay: Double
    let throwing: Bool

    init(delay: Double = 0, throwing: Bool = false) {
        self.delay = delay
        self.throwing = throwing
    }

    func onUpdate(update: ClientUpdate) throws {
        lock.lock(); callCount += 1; lock.unlock()
        if delay > 0 { Thread.sleep(forTimeInterval: delay) }
        lock.lock(); updates.append(update); lock.unlock()
        if throwing { throw ListenerBug() }
    }

    var calls: Int { lock.lock(); defer { lock.unlock() }; return callCount }

    func snapshot() -> [ClientUpdate] {
        lock.lock(); defer { lock.unlock() }
        return updates
    }

    /// Every connection state seen, in order (the current state first).
    func states() -> [ConnectionState] {
        snapshot().compactMap {
            switch $0 {
            case .currentState(let s): return s
            case .stateChanged(_, let to, _, _): return to
            default: return nil
            }
        }
    }

    func messages() -> [ReceivedMessage] {
        snapshot().compactMap {
            if case .messageReceived(let m) = $0 { return m }
            return nil
        }
    }

    func waitFor(_ what: String, timeout: Double = 15, _ condition: ([ClientUpdate]) -> Bool) async throws {
        try await waitUntil(what, timeout: timeout) { condition(self.snapshot()) }
    }

    func waitForState(_ state: ConnectionState, timeout: Double = 15) async throws {
        try await waitUntil("state \(state) (seen: \(states()))", timeout: timeout) { self.states().last == state }
    }
}

/// VmRSS of this process, in KiB.
func rssKib() -> Int {
    let status = (try? String(contentsOfFile: "/proc/self/status", encoding: .utf8)) ?? ""
    for line in status.split(separator: "\n") where line.hasPrefix("VmRSS:") {
        let digits = line.filter { $0.isNumber }
        return Int(digits) ?? -1
    }
    return -1
}

/// Open file descriptors of this process.
func openFds() -> Int {
    (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd").count) ?? -1
}
