// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.28;

import {Signatures} from "./Signatures.sol";

/// @title PeerRegistry: binds an Ethereum account to a peer's Ed25519 and X25519 keys
/// @notice Theory of operation.
///
/// A peer registers its account once with its Ed25519 identity key (its peer id)
/// and its X25519 encryption key, staking at least `minStake` wei (0 = no stake
/// required). It may rotate keys and add stake. To leave it deregisters, which
/// clears its keys and starts an unbonding period; after it the stake can be
/// withdrawn. Registering again during unbonding keeps the stake.
///
/// The contract cannot check Ed25519 signatures cheaply, so it does not prove that
/// the account holds the Ed25519 key. The binding is proven in both directions
/// together with the peer's signed Announce, which names its account: a verifier
/// checks the Announce's signature (Ed25519 -> account) and this registry
/// (account -> Ed25519). For the same reason keys are not unique here: a squatter
/// naming someone else's Ed25519 key gains nothing and cannot block the owner.
///
/// Equivocation. Each committee member commits to its noisy answer vector in its
/// Share (fi_peer.protocol.audit). Two different commitments for one query, both
/// signed by the same member, prove it lied to someone; anyone holding both may
/// call `reportEquivocation`, which slashes the member's whole stake (half to the
/// reporter, half burned: kept here for ever, so self-reporting still costs half)
/// and deregisters it. The Share is signed with the member's Ed25519 key, but the
/// EVM has no Ed25519 precompile (verifying one in Solidity costs ~1M gas or
/// more), so members also sign the commitment statement with their registered
/// Ethereum account, as EIP-712 typed data
/// `ShareCommitment(address querier,bytes16 queryId,bytes32 commitment)` under
/// the domain {name "fi-peer PeerRegistry", version "1", chainId, this registry},
/// and the contract checks both with `ecrecover` (low s, v in {27, 28}).
contract PeerRegistry {
    struct Peer {
        bytes32 ed25519;
        bytes32 x25519;
        uint128 stake;
        uint64 unbondingEnds;
    }

    /// @notice Stake an account needs to count as active (0 = none).
    uint256 public immutable minStake;
    /// @notice Seconds between deregister and the stake becoming withdrawable.
    uint64 public immutable unbondingPeriod;

    /// @notice EIP-712 type of a member's commitment statement (see the notice above).
    bytes32 public constant COMMITMENT_TYPEHASH =
        keccak256("ShareCommitment(address querier,bytes16 queryId,bytes32 commitment)");
    bytes32 private constant DOMAIN_TYPEHASH = keccak256(
        "EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
    );
    bytes32 private constant NAME_HASH = keccak256("fi-peer PeerRegistry");
    bytes32 private constant VERSION_HASH = keccak256("1");

    /// @notice Wei slashed and kept by the registry (burned) so far.
    uint256 public burned;

    mapping(address account => Peer) private _peers;
    /// keccak256(member, querier, queryId) of every equivocation already punished
    mapping(bytes32 evidence => bool) private _reported;
    bool private transient _locked;

    event Registered(
        address indexed account, bytes32 indexed ed25519, bytes32 x25519, uint256 stake
    );
    event KeysUpdated(address indexed account, bytes32 indexed ed25519, bytes32 x25519);
    event StakeAdded(address indexed account, uint256 amount, uint256 stake);
    event Deregistered(address indexed account, bytes32 indexed ed25519, uint64 unbondingEnds);
    event StakeWithdrawn(address indexed account, uint256 amount);
    /// @notice A querier's contribution score for a member (parts per million of a
    /// perfect score; fi_peer.incentives.merit), published for the explorer.
    event ScorePublished(address indexed querier, address indexed member, uint32 scorePpm);
    event Equivocated(
        address indexed member,
        address indexed reporter,
        address querier,
        bytes16 queryId,
        uint256 slashed,
        uint256 reward
    );

    error AlreadyRegistered(address account);
    error NotRegistered(address account);
    error StillRegistered(address account);
    error ZeroKey();
    error StakeTooLow(uint256 stake, uint256 minStake);
    error StakeTooLarge();
    error StillBonded(uint64 until);
    error NothingToWithdraw();
    error TransferFailed();
    error Reentrancy();
    error NotEquivocation();
    error BadSignature();
    error AlreadyReported();
    error LengthMismatch();

    modifier nonReentrant() {
        if (_locked) revert Reentrancy();
        _locked = true;
        _;
        _locked = false;
    }

    constructor(uint256 minStake_, uint64 unbondingPeriod_) {
        minStake = minStake_;
        unbondingPeriod = unbondingPeriod_;
    }

    /// @notice Bind the caller to its keys; `msg.value` is added to its stake.
    function register(bytes32 ed25519, bytes32 x25519) external payable nonReentrant {
        Peer storage peer = _peers[msg.sender];
        if (peer.ed25519 != bytes32(0)) revert AlreadyRegistered(msg.sender);
        if (ed25519 == bytes32(0) || x25519 == bytes32(0)) revert ZeroKey();
        uint256 stake = uint256(peer.stake) + msg.value;
        if (stake < minStake) revert StakeTooLow(stake, minStake);
        if (stake > type(uint128).max) revert StakeTooLarge();
        peer.ed25519 = ed25519;
        peer.x25519 = x25519;
        peer.stake = uint128(stake);
        peer.unbondingEnds = 0;
        emit Registered(msg.sender, ed25519, x25519, stake);
    }

    /// @notice Rotate the caller's keys.
    function updateKeys(bytes32 ed25519, bytes32 x25519) external nonReentrant {
        Peer storage peer = _peers[msg.sender];
        if (peer.ed25519 == bytes32(0)) revert NotRegistered(msg.sender);
        if (ed25519 == bytes32(0) || x25519 == bytes32(0)) revert ZeroKey();
        peer.ed25519 = ed25519;
        peer.x25519 = x25519;
        emit KeysUpdated(msg.sender, ed25519, x25519);
    }

    /// @notice Add `msg.value` to the caller's stake (registered peers only).
    function addStake() external payable nonReentrant {
        Peer storage peer = _peers[msg.sender];
        if (peer.ed25519 == bytes32(0)) revert NotRegistered(msg.sender);
        if (msg.value == 0) revert StakeTooLow(peer.stake, minStake);
        uint256 stake = uint256(peer.stake) + msg.value;
        if (stake > type(uint128).max) revert StakeTooLarge();
        peer.stake = uint128(stake);
        emit StakeAdded(msg.sender, msg.value, stake);
    }

    /// @notice Leave: clear the keys and start unbonding the stake.
    function deregister() external nonReentrant {
        Peer storage peer = _peers[msg.sender];
        bytes32 ed25519 = peer.ed25519;
        if (ed25519 == bytes32(0)) revert NotRegistered(msg.sender);
        uint64 ends = uint64(block.timestamp) + unbondingPeriod;
        peer.ed25519 = bytes32(0);
        peer.x25519 = bytes32(0);
        peer.unbondingEnds = ends;
        emit Deregistered(msg.sender, ed25519, ends);
    }

    /// @notice After deregister + unbondingPeriod, send the caller its stake.
    function withdrawStake() external nonReentrant {
        Peer storage peer = _peers[msg.sender];
        if (peer.ed25519 != bytes32(0)) revert StillRegistered(msg.sender);
        uint256 amount = peer.stake;
        if (amount == 0) revert NothingToWithdraw();
        if (block.timestamp < peer.unbondingEnds) revert StillBonded(peer.unbondingEnds);
        peer.stake = 0;
        peer.unbondingEnds = 0;
        emit StakeWithdrawn(msg.sender, amount);
        (bool ok,) = payable(msg.sender).call{value: amount}("");
        if (!ok) revert TransferFailed();
    }

    /// @notice Slash `member` for two different commitments to one query (querier,
    /// queryId), each signed by `member` (EIP-712 ShareCommitment, 65-byte r|s|v).
    /// The whole stake goes: half to the caller, half burned; the member is
    /// deregistered. Reverts unless the commitments differ and both signatures
    /// recover to `member`; one equivocation is punished once.
    function reportEquivocation(
        address member,
        address querier,
        bytes16 queryId,
        bytes32 commitmentA,
        bytes calldata signatureA,
        bytes32 commitmentB,
        bytes calldata signatureB
    ) external nonReentrant {
        if (commitmentA == commitmentB) revert NotEquivocation();
        address signerA =
            Signatures.recover(commitmentDigest(querier, queryId, commitmentA), signatureA);
        address signerB =
            Signatures.recover(commitmentDigest(querier, queryId, commitmentB), signatureB);
        if (member == address(0) || signerA != member || signerB != member) revert BadSignature();
        bytes32 evidence = keccak256(abi.encode(member, querier, queryId));
        if (_reported[evidence]) revert AlreadyReported();
        _reported[evidence] = true;
        Peer storage peer = _peers[member];
        uint256 slashed = peer.stake;
        uint256 reward = slashed / 2;
        peer.stake = 0;
        peer.unbondingEnds = 0;
        peer.ed25519 = bytes32(0);
        peer.x25519 = bytes32(0);
        burned += slashed - reward;
        emit Equivocated(member, msg.sender, querier, queryId, slashed, reward);
        if (reward > 0) {
            (bool ok,) = payable(msg.sender).call{value: reward}("");
            if (!ok) revert TransferFailed();
        }
    }

    /// @notice Publish the caller's (a querier's) contribution scores of `members`:
    /// one event each, nothing stored. Scores are the caller's own view, attributed
    /// to it; readers weigh them by who published.
    function publishScores(address[] calldata members, uint32[] calldata scoresPpm) external {
        if (members.length != scoresPpm.length) revert LengthMismatch();
        for (uint256 i = 0; i < members.length; ++i) {
            emit ScorePublished(msg.sender, members[i], scoresPpm[i]);
        }
    }

    /// @notice The EIP-712 digest a member signs for its commitment to one query.
    function commitmentDigest(address querier, bytes16 queryId, bytes32 commitment)
        public
        view
        returns (bytes32)
    {
        bytes32 domain = keccak256(
            abi.encode(DOMAIN_TYPEHASH, NAME_HASH, VERSION_HASH, block.chainid, address(this))
        );
        bytes32 structHash = keccak256(abi.encode(COMMITMENT_TYPEHASH, querier, queryId, commitment));
        return keccak256(abi.encodePacked("\x19\x01", domain, structHash));
    }

    /// @notice The account's keys, stake and unbonding end (zero keys: not registered).
    function peerOf(address account) external view returns (Peer memory) {
        return _peers[account];
    }

    /// @notice Registered, with at least the minimum stake.
    function isActive(address account) external view returns (bool) {
        Peer storage peer = _peers[account];
        return peer.ed25519 != bytes32(0) && peer.stake >= minStake;
    }
}
