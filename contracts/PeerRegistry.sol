// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.28;

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

    mapping(address account => Peer) private _peers;
    bool private transient _locked;

    event Registered(
        address indexed account, bytes32 indexed ed25519, bytes32 x25519, uint256 stake
    );
    event KeysUpdated(address indexed account, bytes32 indexed ed25519, bytes32 x25519);
    event StakeAdded(address indexed account, uint256 amount, uint256 stake);
    event Deregistered(address indexed account, bytes32 indexed ed25519, uint64 unbondingEnds);
    event StakeWithdrawn(address indexed account, uint256 amount);

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
